"""The picture of a training run: its loss and its validation ROUGE against the optimizer step,
from the Trainer's log history, as a PNG written beside the adapters (`report.html` shows it)."""

from __future__ import annotations

import io
from pathlib import Path

from samsum_qlora import files

SHOWN = (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"))


def curves(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series: "train_loss", "validation_loss" and each validation ROUGE in % (pure)."""
    out: dict[str, list[tuple[int, float]]] = {"train_loss": [], "validation_loss": []}
    out |= {key: [] for key, _ in SHOWN}
    for entry in log_history:
        if "loss" in entry:
            out["train_loss"].append((entry["step"], entry["loss"]))
        if "eval_rouge1" in entry:
            out["validation_loss"].append((entry["step"], entry["eval_loss"]))
            for key, _ in SHOWN:
                out[key].append((entry["step"], 100 * entry[f"eval_{key}"]))
    return out


def render(log_history: list[dict], best_step: int | None) -> bytes:
    """Loss on the left axis, ROUGE on the right one, the best step marked. The object API with the
    Agg canvas: no global backend switch, no display needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = curves(log_history)
    fig = Figure(figsize=(7.0, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    loss_ax = fig.add_subplot()
    for key, label, style in (("train_loss", "training loss", "-"), ("validation_loss", "validation loss", "--")):
        if series[key]:
            loss_ax.plot(*zip(*series[key]), style, color="tab:gray", label=label)
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("loss")
    handles, labels = loss_ax.get_legend_handles_labels()
    if series["rouge1"]:
        rouge_ax = loss_ax.twinx()
        for key, label in SHOWN:
            rouge_ax.plot(*zip(*series[key]), "o-", markersize=3, label=f"validation {label}")
        rouge_ax.set_ylabel("validation ROUGE F-measure (%)")
        more = rouge_ax.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if best_step:
        loss_ax.axvline(best_step, color="black", linestyle=":", label=f"best: step {best_step}")
        handles, labels = loss_ax.get_legend_handles_labels()[0][-1:] + handles, [f"best: step {best_step}"] + labels
    loss_ax.grid(alpha=0.3)
    loss_ax.set_title("Training loss and validation ROUGE")
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def write(path: Path, log_history: list[dict], best_step: int | None) -> None:
    files.write_bytes(path, render(log_history, best_step))
