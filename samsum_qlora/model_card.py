"""The model card (`README.md`, the Hugging Face Hub's format) of a merged or exported model.

Its YAML header is what the Hub indexes: base_model, datasets, library_name, tags, the base's
licence and the newest evaluation of these adapters as `model-index`. The body says the same for
people: the scores with their 95% intervals, how they were decoded, how the adapters were trained,
how to run the model with transformers, llama.cpp and Ollama, and the line that publishes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from samsum_qlora import files, layout
from samsum_qlora.config import Config
from samsum_qlora.metrics import SHOWN, bootstrap_interval, rouge_per_example

DATASET = "knkarthick/samsum"  # SAMSum on the Hub as plain CSV, this package's default data.source
TRAINING_KEYS = (  # the settings a reader of the card asks about first
    ("lora", ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora")),
    ("train", ("learning_rate", "num_train_epochs", "max_steps", "max_tokens_per_batch", "lr_scheduler_type", "seed")),
    ("quantization", ("load_in_4bit", "bnb_4bit_quant_type")),
    ("data", ("max_length", "max_train_samples")),
)
DECODING_KEYS = ("max_new_tokens", "num_beams", "do_sample", "temperature", "top_p", "repetition_penalty")


def newest_eval(adapters: Path) -> layout.EvalDir | None:
    """The newest finished evaluation, in the adapters' run folder, of exactly these adapter bytes."""
    stamp = {
        name: files.sha256(adapters / name)
        for name in (layout.ADAPTER_CONFIG, layout.ADAPTER_WEIGHTS)
        if (adapters / name).is_file()
    }
    found = []
    for folder in sorted(adapters.parent.glob("eval*")):
        evaluation = layout.EvalDir(folder)
        if evaluation.is_finished() and evaluation.identity.is_file():
            if files.read_json(evaluation.identity).get("adapters") == stamp:
                found.append(evaluation)
    return max(found, key=lambda e: e.metrics.stat().st_mtime, default=None)


def scores(evaluation: layout.EvalDir) -> dict:
    """metrics.json's means (as they are) with bootstrap intervals from its predictions, x100."""
    metrics = files.read_json(evaluation.metrics)
    records = files.read_jsonl(evaluation.predictions)
    per_example = rouge_per_example([str(r["prediction"]) for r in records], [str(r["reference"]) for r in records])
    shown = {}
    for metric, label in SHOWN:
        low, high = bootstrap_interval(per_example[metric])
        shown[metric] = {"label": label, "value": 100 * metrics[metric], "low": 100 * low, "high": 100 * high}
    decoding = {k: metrics["config"]["eval"].get(k) for k in DECODING_KEYS}
    return {"scores": shown, "split": metrics["split"], "n": metrics["n_examples"], "decoding": decoding}


def base_licence(base: str, revision: str | None) -> str | None:
    """The base's licence from its own model card's header: a local folder's README.md, else the
    Hub's (read from the cache when offline); None when neither can be read."""
    readme = Path(base).expanduser() / "README.md"
    if not readme.is_file() and not layout.is_local(base):
        try:
            from huggingface_hub import hf_hub_download

            readme = Path(hf_hub_download(base, "README.md", revision=revision))
        except Exception:  # offline and not cached, gated, or no card: the card says "other"
            return None
    if not readme.is_file():
        return None
    header = readme.read_text(encoding="utf-8").split("---")
    meta = yaml.safe_load(header[1]) if len(header) > 2 else None
    return meta.get("license") if isinstance(meta, dict) else None


def header(cfg: Config, licence: str | None, evaluation: dict | None, name: str) -> dict:
    meta = {
        "library_name": "transformers",
        "license": licence or "other",
        "datasets": [DATASET],
        "tags": ["summarization", "samsum", "qlora", "lora", "samsum-qlora"],
        "pipeline_tag": "text-generation",
    }
    if not layout.is_local(cfg.model.name):  # the Hub links a base by its id only
        meta["base_model"] = cfg.model.name
    if evaluation is not None:
        results = [
            {"type": m, "value": round(s["value"], 2), "name": f"{s['label']} (x100)"}
            for m, s in evaluation["scores"].items()
        ]
        meta["model-index"] = [
            {
                "name": name,
                "results": [
                    {
                        "task": {"type": "summarization", "name": "Summarization"},
                        "dataset": {"type": DATASET, "name": "SAMSum", "split": evaluation["split"]},
                        "metrics": results,
                    }
                ],
            }
        ]
    return meta


def evaluation_section(evaluation: dict | None) -> list[str]:
    if evaluation is None:
        return ["No evaluation of these adapters was found beside them: run `samsum-qlora eval` first.", ""]
    lines = [
        f"On {evaluation['n']} SAMSum {evaluation['split']} dialogues (mean per-example F-measure, Porter "
        "stemmer, x100; 95% bootstrap intervals):",
        "",
        "| " + " | ".join(s["label"] for s in evaluation["scores"].values()) + " |",
        "|" + "---|" * len(evaluation["scores"]),
        "| "
        + " | ".join(f"{s['value']:.2f} [{s['low']:.2f}, {s['high']:.2f}]" for s in evaluation["scores"].values())
        + " |",
        "",
        "Decoding: " + ", ".join(f"{k}={v}" for k, v in evaluation["decoding"].items()) + ".",
        "",
    ]
    return lines


def training_section(cfg: Config) -> list[str]:
    settings = cfg.to_dict()
    rows = [f"| {section}.{key} | `{settings[section][key]}` |" for section, keys in TRAINING_KEYS for key in keys]
    return ["| setting | value |", "|---|---|", *rows, ""]


def usage_section(cfg: Config, ggufs: list[str], stops: list[str]) -> list[str]:
    instruction = cfg.data.task_instruction
    lines = [
        "With transformers (this folder holds the merged model):" if not ggufs else "With llama.cpp:",
        "",
        "```bash" if ggufs else "```python",
    ]
    if ggufs:
        lines += [
            f"llama-cli -m {ggufs[0]} -st --temp 0 --top-k 1 -n {cfg.eval.max_new_tokens} \\",
            f'  -sys {json.dumps(instruction)} -p "$(cat dialogue.txt)"',
            "```",
            "",
            "The GGUF's chat template adds that instruction itself when a conversation has no system message, "
            "so `llama-server -m " + ggufs[0] + "` summarises a dialogue sent as the only user message. "
            f"Generation stops at {', '.join(f'`{s}`' for s in stops)}.",
            "",
            "With Ollama (the Modelfile holds the instruction, the stop tokens and greedy decoding):",
            "",
            "```bash",
            "ollama create samsum-summariser -f Modelfile",
            'ollama run samsum-summariser "$(cat dialogue.txt)"',
            "```",
            "",
        ]
    else:
        lines += [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "tok = AutoTokenizer.from_pretrained('.')",
            "model = AutoModelForCausalLM.from_pretrained('.')",
            f"messages = [{{'role': 'system', 'content': {instruction!r}}}, {{'role': 'user', 'content': dialogue}}]",
            "ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt')",
            f"out = model.generate(ids, max_new_tokens={cfg.eval.max_new_tokens}, do_sample=False)",
            "print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))",
            "```",
            "",
            "(`samsum-qlora summarize dialogues.txt --base-only --set model.name=.` does the same in batches.) "
            "For llama.cpp and Ollama: `samsum-qlora export --adapters ADAPTERS --out FOLDER`.",
            "",
        ]
    return lines


def card(cfg: Config, *, licence: str | None, evaluation: dict | None, ggufs: list[str], stops: list[str]) -> str:
    """The whole README.md: a pure function of what it reports."""
    name = "samsum-" + Path(cfg.model.name).name.lower()
    body = [
        f"# {name}",
        "",
        f"`{cfg.model.name}` fine-tuned with QLoRA on SAMSum to summarise dialogues, by "
        "samsum-qlora; the LoRA adapters are merged into the base "
        + (f"and converted to GGUF ({', '.join(ggufs)}) by llama.cpp's own converter." if ggufs else "weights."),
        "",
        f"Its task instruction, as in training: *{cfg.data.task_instruction}*",
        "",
        "## Evaluation",
        "",
        *evaluation_section(evaluation),
        "## Training",
        "",
        *training_section(cfg),
        "## How to run it",
        "",
        *usage_section(cfg, ggufs, stops),
        "## Publish",
        "",
        "```bash",
        "hf upload YOUR_NAME/" + name + " .",
        "```",
        "",
    ]
    front = yaml.safe_dump(header(cfg, licence, evaluation, name), sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n\n" + "\n".join(body)


def trained_config(adapters: Path, cfg: Config) -> Config:
    """How the adapters were trained: the run's config.yaml beside them, else `cfg`."""
    from samsum_qlora.config import load_config

    saved = layout.RunDir(adapters.parent).config
    return load_config(saved, {"model.name": cfg.model.name}) if saved.is_file() else cfg


def write(folder: Path, cfg: Config, adapters: Path, *, ggufs: list[str] = (), stops: list[str] = ()) -> str:
    """Write `folder`/README.md for a model made from `adapters`; returns the text."""
    evaluation = newest_eval(adapters)
    text = card(
        trained_config(adapters, cfg),
        licence=base_licence(cfg.model.name, cfg.model.revision),
        evaluation=None if evaluation is None else scores(evaluation),
        ggufs=list(ggufs),
        stops=list(stops),
    )
    files.write_text(folder / "README.md", text)
    return text
