"""`samsum-qlora report`: the tutorial's comparison table over several evaluations, with bootstrap
confidence intervals and a bar chart.

Scores are recomputed from each folder's predictions.jsonl, so the table and its intervals come
from the same per-example numbers; metrics.json supplies the model name and type.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

from samsum_qlora import files
from samsum_qlora.errors import UserError
from samsum_qlora.layout import EvalDir, ReportDir, RunDir
from samsum_qlora.metrics import (
    LEVEL,
    RESAMPLES,
    SEED,
    SHOWN,
    bootstrap_interval,
    mean,
    results_table,
    rouge_per_example,
    table_cell,
)
from samsum_qlora.predictor import KIND_API, KIND_BASE, KIND_QLORA
from samsum_qlora.report_page import label, render_page, row_keys

KIND_ORDER = (KIND_BASE, KIND_API, KIND_QLORA)  # the tutorial's row order within one run folder


@dataclass
class Scored:
    """One evaluation folder, re-scored."""

    folder: Path
    model: str
    kind: str
    per_example: dict[str, list[float]]  # metric -> F-measure per example, fractions 0-1
    records: list[dict] = field(default_factory=list)  # predictions.jsonl's rows, for report.html
    curve: bytes | None = None  # the training run's training_curve.png, beside the adapters scored
    facts: dict[str, str] = field(default_factory=dict)  # adapters, step, decoding, split (`facts`)

    def mean(self, metric: str) -> float:
        return mean(self.per_example[metric])


# --- finding and reading evaluations -------------------------------------------------------------


def is_eval_dir(path: Path) -> bool:
    return EvalDir(path).metrics.is_file()


def eval_dirs(paths: list[Path]) -> list[Path]:
    """Each path is an eval folder, or a training run folder whose eval*/ folders are used.
    Argument order is kept; duplicates (the same folder twice) are dropped."""
    found: list[Path] = []
    for path in paths:
        if not path.exists():
            raise UserError(f"{path} does not exist")
        if not path.is_dir():
            raise UserError(f"{path} is not a folder: give an eval folder or a training run folder")
        if is_eval_dir(path):
            found.append(path)
            continue
        inside = RunDir(path).eval_dirs()
        if not inside:
            raise UserError(
                f"{path} holds no metrics.json and no eval*/ folder with one: run `samsum-qlora eval` first"
            )
        found += sorted(inside, key=lambda p: (_kind_rank(p), p.name))
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _kind_rank(folder: Path) -> int:
    try:
        kind = files.read_json(EvalDir(folder).metrics).get("type")
    except (UserError, AttributeError):
        kind = None
    return KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)


def load_scored(folder: Path) -> Scored:
    """metrics.json (model, type) and per-example ROUGE recomputed from predictions.jsonl."""
    layout = EvalDir(folder)
    meta = files.read_json(layout.metrics)
    if not isinstance(meta, dict) or not meta.get("model") or not meta.get("type"):
        raise UserError(f"{layout.metrics} has no 'model' and 'type': was it written by samsum-qlora eval?")
    predictions_file = layout.predictions
    if not predictions_file.is_file():
        raise UserError(f"{folder} has metrics.json but no predictions.jsonl: rerun its eval to finish it")
    records = files.read_whole_jsonl(predictions_file)
    if not records:
        raise UserError(f"{predictions_file} holds no predictions")
    if any(not isinstance(r, dict) or not {"id", "prediction", "reference"} <= set(r) for r in records):
        raise UserError(f"{predictions_file} has a row without id, prediction and reference")
    check_each_row_once(predictions_file, records)
    check_texts(predictions_file, records)
    for metric, _ in SHOWN:
        value = meta.get(metric, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{layout.metrics}: {metric} is {value!r}, not a number")
    per_example = rouge_per_example([str(r["prediction"]) for r in records], [str(r["reference"]) for r in records])
    scored = Scored(
        folder=folder,
        model=str(meta["model"]),
        kind=str(meta["type"]),
        per_example=per_example,
        records=records,
        curve=training_curve(meta.get("adapters")),
        facts=facts(meta),
    )
    for metric, _ in SHOWN:  # a hand-edited or stale folder would make the table disagree with its eval
        if metric in meta and abs(float(meta[metric]) - scored.mean(metric)) > 5e-5:
            print(
                f"warning: {folder}: {metric} in metrics.json is {meta[metric]:.4f}, predictions.jsonl gives "
                f"{scored.mean(metric):.4f}; the report uses the latter",
                file=sys.stderr,
            )
    return scored


def facts(meta: dict) -> dict[str, str]:
    """What an evaluation scored and how, from its metrics.json: the adapters, the training step
    they are from (their run's train_metrics.json), the decoding settings that differ from greedy,
    the split. Missing facts are left out (older folders)."""
    from samsum_qlora.config import DECODING_KEYS, EvalArgs

    out = {}
    adapters = meta.get("adapters")
    out["adapters"] = str(adapters) if adapters else "none"
    trained = RunDir(Path(adapters).parent).train_metrics if adapters else None
    if trained is not None and trained.is_file():
        record = files.read_json(trained)
        step = record.get("adapters_step", record.get("global_step"))
        if step is not None:
            out["step"] = f"{step} of {record.get('global_step', step)}"
    settings = (meta.get("config") or {}).get("eval")
    if isinstance(settings, dict):
        plain = EvalArgs()
        changed = [f"{k}={settings[k]}" for k in DECODING_KEYS if k in settings and settings[k] != getattr(plain, k)]
        out["decoding"] = ", ".join(changed) or "greedy"
    if meta.get("split"):
        out["split"] = str(meta["split"])
    return out


def training_curve(adapters: str | None) -> bytes | None:
    """The picture `train` drew beside these adapters, when they have one."""
    path = RunDir(Path(adapters).parent).chart if adapters else None
    return path.read_bytes() if path is not None and path.is_file() else None


def check_each_row_once(path: Path, records: list[dict]) -> None:
    """A row of the split scored twice (a line repeated by hand or by a bad merge) would count twice."""
    seen: dict = {}
    for number, record in enumerate(records, 1):
        if isinstance(record.get("index"), int):
            seen.setdefault(record["index"], []).append(number)
    repeated = [lines for lines in seen.values() if len(lines) > 1]
    if repeated:
        where = "; ".join(f"lines {', '.join(map(str, lines))}" for lines in repeated[:5])
        raise UserError(
            f"{path} is damaged: {len(repeated)} rows of the split appear more than once ({where}); "
            "rerun its eval with --overwrite"
        )


def check_texts(path: Path, records: list[dict]) -> None:
    """A prediction or reference that is not text (null, a number) would be scored as its printed
    form ("None"): the row is refused, naming its line."""
    for number, record in enumerate(records, 1):
        for key in ("prediction", "reference"):
            if not isinstance(record[key], str):
                value = "null" if record[key] is None else f"{type(record[key]).__name__} {record[key]!r:.40}"
                raise UserError(f"{path} line {number}: {key} is {value}, not text; rerun its eval with --overwrite")


# --- statistics (pure) ---------------------------------------------------------------------------


def intervals(scored: Scored, **kwargs) -> dict[str, tuple[float, float]]:
    return {metric: bootstrap_interval(scored.per_example[metric], **kwargs) for metric, _ in SHOWN}


# --- rendering -----------------------------------------------------------------------------------


def interval_table(rows: list[Scored], cis: list[dict[str, tuple[float, float]]]) -> str:
    """Percent, 2 decimals, like the tutorial's table; n = examples scored."""
    lines = [
        "| Model | Type | n | " + " | ".join(f"{label} 95% CI" for _, label in SHOWN) + " |",
        "|---|---|---|" + "---|" * len(SHOWN),
    ]
    for row, ci in zip(rows, cis):
        cells = [f"{100 * ci[m][0]:.2f} – {100 * ci[m][1]:.2f}" for m, _ in SHOWN]
        lines.append(
            f"| {table_cell(row.model)} | {table_cell(row.kind)} | {len(row.records)} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def render_markdown(rows: list[Scored], cis: list[dict[str, tuple[float, float]]]) -> str:
    table = results_table([(r.model, r.kind, {m: r.mean(m) for m, _ in SHOWN}) for r in rows])
    parts = [
        "## ROUGE on SAMSum",
        "",
        table,
        "",
        f"{int(LEVEL * 100)}% bootstrap confidence intervals ({RESAMPLES} resamples of the examples, seed {SEED}):",
        "",
        interval_table(rows, cis),
        "",
    ]
    if len({tuple(keys) for keys in row_keys(rows)}) > 1:  # as the page matches rows
        parts += [
            "Note: these evaluations did not score the same examples, so their rows are not directly comparable.",
            "",
        ]
    parts += ["Sources: " + ", ".join(f"`{r.folder}`" for r in rows), ""]
    return "\n".join(parts)


def render_chart(rows: list[Scored], cis: list[dict[str, tuple[float, float]]]) -> bytes:
    """Grouped bars (one group per metric, one bar per evaluation) with the intervals as error bars.
    The object API with the Agg canvas: no global backend switch, no display needed."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.0 + 0.25 * len(rows)), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(rows)
    x = np.arange(len(SHOWN))
    top = 0.0
    for k, (row, ci) in enumerate(zip(rows, cis)):
        means = np.array([100 * row.mean(m) for m, _ in SHOWN])
        lo = np.array([100 * ci[m][0] for m, _ in SHOWN])
        hi = np.array([100 * ci[m][1] for m, _ in SHOWN])
        # clip at 0: percentile interpolation can leave a bound a hair past the mean
        yerr = np.clip(np.vstack([means - lo, hi - means]), 0, None)
        ax.bar(x + (k - (len(rows) - 1) / 2) * width, means, width, yerr=yerr, capsize=3, label=label(row))
        top = max(top, float(hi.max()))
    ax.set_xticks(x, [label for _, label in SHOWN])
    ax.set_ylabel("F-measure (%)")
    ax.set_ylim(0, min(105.0, max(10.0, top * 1.1)))
    ax.set_title(f"ROUGE on SAMSum, with {int(LEVEL * 100)}% bootstrap intervals")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    # below the axes, so no bar or interval is hidden behind it
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=1, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def name_apart(rows: list[Scored]) -> list[Scored]:
    """Rows of the same model and type get what tells them apart: their run folder's name (two recipes
    of one base), else their own folder's (two evaluations in one run), else both, else the path."""
    groups: dict[tuple[str, str], list[Scored]] = {}
    for r in rows:
        groups.setdefault((r.model, r.kind), []).append(r)
    for group in (g for g in groups.values() if len(g) > 1):
        folders = [r.folder.resolve() for r in group]
        for naming in (lambda p: p.parent.name, lambda p: p.name, lambda p: f"{p.parent.name}/{p.name}", str):
            names = [naming(p) for p in folders]
            if len(set(names)) == len(names):
                break
        for r, name in zip(group, names):
            r.model = f"{r.model} ({name})"
    return rows


def write_report(paths: list[Path], out_dir: Path, *, html: bool = True) -> str:
    """Report on every evaluation under `paths`; writes <out>/report.md, report.png and (with `html`)
    report.html, returns the Markdown."""
    folders = eval_dirs(paths)
    rows = name_apart([load_scored(f) for f in folders])  # every folder is read before anything is written
    cis = [intervals(r) for r in rows]
    markdown = render_markdown(rows, cis)
    png = render_chart(rows, cis)
    page = render_page(rows, cis, png) if html else None
    out = ReportDir(files.ensure_writable_dir(out_dir))
    written = {out.markdown: markdown.encode("utf-8"), out.chart: png}
    if page is not None:
        written[out.page] = page.encode("utf-8")
    with files.disk_full_is_user_error(out_dir, "writing the report", "rerun the same command (nothing was replaced)"):
        files.write_all_or_none(written)  # never a new report.md beside an old report.html
    return markdown
