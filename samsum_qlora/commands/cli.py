"""The `samsum-qlora` command. Each command parses options and calls one function; heavy imports
happen inside the commands so `--help` answers at once."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import click

from samsum_qlora.errors import UserError

CONFIG_HELP = "YAML config (default: the shipped Llama 3.2 1B recipe)."
ADAPTERS_HELP = (
    "LoRA adapters dir (default: <train.output_dir>/lora_adapters). Without --config, the base model and "
    "settings they were trained with (their run's config.yaml, else adapter_config.json)."
)
SET_HELP = "Override a config key, e.g. --set train.max_steps=100 (repeatable; beats the YAML)."


# --help lists the commands in the order they are used, not alphabetically
COMMAND_ORDER = ("train", "eval", "summarize", "report", "merge", "export", "config", "preprocess", "bench")


class Group(click.Group):
    """Turns our UserError (and click's own usage errors) into one line on stderr and exit code 2."""

    def list_commands(self, ctx):
        return sorted(self.commands, key=lambda name: (COMMAND_ORDER + (name,)).index(name))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            _close_progress_bars()  # so the error starts a line of its own
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


def _close_progress_bars() -> None:
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()


@contextlib.contextmanager
def _stops_on_signals(kept: str, then: str = "rerun the same command to resume"):
    """A command that Ctrl-C or SIGTERM ends with one line saying what is `kept` and the exit code
    128 + the signal (click alone prints "Aborted!" and exits 1; SIGTERM kills unsaid). Train's
    first signal during training saves a checkpoint and stops on its own (`Stopped`)."""
    from samsum_qlora import runtime

    try:
        with runtime.sigterm_interrupts():
            yield
    except KeyboardInterrupt as e:
        _close_progress_bars()
        name, code = ("SIGTERM", 143) if isinstance(e, runtime.Terminated) else ("SIGINT", 130)
        click.echo(f"stopped: stopped by {name}; {kept}: {then}", err=True)
        sys.exit(code)


def _config(config_path, overrides, extra: dict | None = None, *, adapters: str | None = None):
    """The config: defaults < YAML < --set < `extra` (options that stand for config keys). With
    `adapters` and no YAML, the settings they were trained with stand in for it (said on stderr)."""
    from samsum_qlora.config import load_config, parse_overrides

    given = parse_overrides(overrides) | {key: value for key, value in (extra or {}).items() if value is not None}
    if adapters is None or config_path is not None or not Path(adapters).is_dir():
        return load_config(config_path, given)  # a missing folder is said where adapters are checked
    from samsum_qlora import layout

    trained, source = layout.trained_settings(Path(adapters))
    cfg = load_config(None, trained | given)
    if "model.name" in trained and "model.name" not in given:
        click.echo(f"note: base model {cfg.model.name} and the settings it was trained with, from {source}", err=True)
    return cfg


def config_option_with(help: str):
    return click.option("--config", "config_path", type=click.Path(dir_okay=False), help=help)


config_option = config_option_with(CONFIG_HELP)
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
# merge and export: the adapters a new folder is made from
from_adapters_option = click.option(
    "--adapters", required=True, type=click.Path(path_type=Path), help="LoRA adapters folder."
)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="samsum-qlora")
def main():
    """QLoRA fine-tuning of a chat model (Llama 3.2 1B-Instruct by default) on SAMSum, scored with
    ROUGE against the base model and an API model.

    \b
    In the order they are used:
      samsum-qlora train            LoRA adapters (the shipped recipe)
      samsum-qlora eval             ROUGE on the test split (or --base-only)
      samsum-qlora summarize FILE   summaries for your own dialogues
      samsum-qlora report RUN_DIR   the evaluations side by side

    The tiny demo on a CPU: add --config configs/smoke.yaml to train and eval. Each command's
    options: samsum-qlora COMMAND --help."""
    from samsum_qlora.runtime import quiet_known_noise

    # Batches change shape from step to step; expandable segments stop the CUDA allocator from
    # fragmenting (and syncing on new allocations). Set before torch is imported by a command.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    quiet_known_noise()


@main.command(short_help="Train LoRA adapters on a 4-bit base: <train.output_dir>/lora_adapters.")
@config_option
@set_option
@click.option("--overwrite", is_flag=True, help="Replace the finished adapters in train.output_dir.")
@click.option("--resume", type=click.Path(), help="Resume from this checkpoint (default: the newest complete one).")
@_stops_on_signals("the complete checkpoints are kept")
def train(config_path, overrides, overwrite, resume):
    """Train LoRA adapters on a 4-bit base; saves <train.output_dir>/lora_adapters/.

    Rerunning the same command into the same output dir resumes from the newest complete
    checkpoint."""
    from samsum_qlora.commands.train import train_adapters
    from samsum_qlora.training import Stopped

    cfg = _config(config_path, overrides)
    try:
        train_adapters(cfg, overwrite=overwrite, resume=resume)
    except Stopped as e:
        click.echo(f"stopped: {e}", err=True)
        sys.exit(e.code)  # 128 + the signal, what a job scheduler expects


@main.command(name="eval", short_help="Generate summaries for a split in batches and score them with ROUGE.")
@config_option
@set_option
@click.option("--adapters", type=click.Path(), help=ADAPTERS_HELP)
@click.option("--base-only", is_flag=True, help="Score the base model without adapters.")
@click.option("--split", default=None, help="Split to score (default: eval.split, 'test').")
@click.option("--limit", type=int, default=None, help="Score only the first N examples.")
@click.option("--output-dir", type=click.Path(), help="Where metrics.json and predictions.jsonl go.")
@click.option("--overwrite", is_flag=True, help="Replace an output dir that holds another evaluation.")
@click.option(
    "--api-model",
    default=None,
    metavar="NAME",
    help="Score this model of an OpenAI-compatible API instead (key from $OPENAI_API_KEY).",
)
@click.option("--api-base", default=None, metavar="URL", help="API root for --api-model (sets api.base).")
@click.option("--api-concurrency", type=int, default=None, help="Requests in flight at once (sets api.concurrency).")
@click.option("--api-timeout", type=float, default=None, help="Seconds to wait for one answer (sets api.timeout).")
@_stops_on_signals("the predictions saved so far are kept")
def evaluate_cmd(
    config_path,
    overrides,
    adapters,
    base_only,
    split,
    limit,
    output_dir,
    overwrite,
    api_model,
    api_base,
    api_concurrency,
    api_timeout,
):
    """Generate summaries in batches and score them with ROUGE.

    With --api-model, the summaries come from a Chat Completions endpoint (OpenAI, vLLM, Ollama,
    LiteLLM), asked with the same instruction and dialogue; results go to
    <train.output_dir>/eval-api-NAME."""
    from samsum_qlora.commands.evaluate import evaluate_model, plan_eval

    api_options = {"api.base": api_base, "api.concurrency": api_concurrency, "api.timeout": api_timeout}
    given = [f"--{key.replace('.', '-')}" for key, value in api_options.items() if value is not None]
    if api_model is None and given:
        raise UserError(f"{' and '.join(given)} need{'s' if len(given) == 1 else ''} --api-model NAME")
    cfg = _config(config_path, overrides, api_options, adapters=None if base_only else adapters)
    plan = plan_eval(
        cfg,
        adapters=adapters,
        base_only=base_only,
        split=split,
        limit=limit,
        output_dir=output_dir,
        api_model=api_model,
    )
    predict = None
    if plan.api_base is not None:
        from samsum_qlora import api

        predict = api.predictor(cfg, model=plan.model, key=os.environ.get(api.KEY_ENV))
    evaluate_model(cfg, plan, overwrite=overwrite, predict=predict)


@main.command(short_help="Summarise your own dialogues (a file or stdin) as eval does: JSON Lines.")
@click.argument("source", required=False, metavar="[INPUT]")
@config_option
@set_option
@click.option("--out", type=click.Path(path_type=Path), help="Write the JSON Lines to this file instead of stdout.")
@click.option("--adapters", type=click.Path(), help=ADAPTERS_HELP)
@click.option("--base-only", is_flag=True, help="model.name alone, without adapters: a base or a merged model.")
@_stops_on_signals("nothing was written", "rerun the same command")
def summarize(source, config_path, overrides, out, adapters, base_only):
    """Summarise dialogues that have no reference summary, as eval generates.

    INPUT is a .csv, .jsonl, .json or .parquet file with a dialogue column, a .txt file of dialogues
    separated by blank lines, or - (the default) for standard input: JSON Lines if it starts with
    "{" or "[", else text blocks. Writes one JSON line per input dialogue, in input order: its
    columns (an input summary column becomes "reference") plus "summary" and "ended"; an empty
    dialogue is skipped, its line with "summary": null. Progress goes to stderr, so
    `cat dialogues.txt | samsum-qlora summarize - > summaries.jsonl` is clean."""
    from samsum_qlora.commands.summarize import summarize_dialogues

    summarize_dialogues(
        _config(config_path, overrides, adapters=None if base_only else adapters),
        source=source,
        out=out,
        adapters=adapters,
        base_only=base_only,
        stdin=click.get_binary_stream("stdin"),
        stdout=click.get_binary_stream("stdout"),
    )


@main.command(name="config", short_help="Print the resolved config, each key with what it means.")
@config_option
@set_option
def show_config(config_path, overrides):
    """Print the resolved config (defaults < YAML < --set), each key with what it means. The
    output is itself a config: save it and pass it to --config."""
    from samsum_qlora.config import annotated_yaml

    click.echo(annotated_yaml(_config(config_path, overrides)), nl=False)


@main.command(short_help="Tokenise a split as training does; --show N marks the trained tokens.")
@config_option
@set_option
@click.option("--split", default="train", show_default=True, help="Split to tokenise.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Where save_to_disk writes.")
@click.option("--show", type=int, default=0, help="Print N examples with the trained tokens marked.")
@_stops_on_signals("nothing was written", "rerun the same command")
def preprocess(config_path, overrides, split, out_dir, show):
    """Tokenise a split exactly as training does and save it (needs only the tokenizer).

    With --show N, prints N examples; the tokens the loss is computed on are shown between
    ⟦ and ⟧ (and in green on a terminal)."""
    from samsum_qlora.commands.preprocess import tokenize_split

    tokenize_split(_config(config_path, overrides), split=split, out_dir=Path(out_dir), show=show)


@main.command(short_help="Compare evaluations: ROUGE with 95% intervals, a chart and a page.")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="RUN_OR_EVAL_DIR...")
@click.option(
    "--out",
    "out_dir",
    default="report",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Where report.md, report.png and report.html go.",
)
@click.option(
    "--html/--no-html",
    default=True,
    show_default=True,
    help="Also write report.html: the table, the chart, paired comparisons and every example, in one page.",
)
@_stops_on_signals("the report files are all the old ones or all new", "rerun the same command")
def report(dirs, out_dir, html):
    """Compare evaluations: the ROUGE table with bootstrap 95% intervals, as Markdown and a chart,
    and a self-contained web page to browse the examples (open report.html in a browser).

    Each argument is an eval folder (metrics.json + predictions.jsonl) or a training run folder,
    whose eval*/ folders are all used."""
    from samsum_qlora.commands.report import write_report
    from samsum_qlora.layout import ReportDir

    click.echo(write_report(list(dirs), out_dir, html=html), nl=False)
    out = ReportDir(out_dir)
    written = [out.markdown, out.chart] + ([out.page] if html else [])
    click.echo("wrote " + ", ".join(map(str, written[:-1])) + f" and {written[-1]}", err=True)


@main.command(short_help="Merge LoRA adapters into the base weights and save a plain model.")
@config_option_with("YAML config naming the base model (default: the adapters' adapter_config.json).")
@set_option
@from_adapters_option
@click.option(
    "--out", "out_dir", required=True, type=click.Path(path_type=Path), help="New folder for the merged model."
)
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
    default=None,
    help="Dtype to store the merged weights in (default: the base checkpoint's own). The merge and "
    "its check always run in float32.",
)
@_stops_on_signals("nothing was written", "rerun the same command")
def merge(config_path, overrides, adapters, out_dir, dtype):
    """Merge LoRA adapters into the base weights and save a plain model.

    The merged model's logits must match base + adapters on probe prompts, else nothing is written."""
    from samsum_qlora.commands.merge import merge_adapters

    merge_adapters(
        adapters, out_dir, cfg=_config(config_path, overrides) if config_path or overrides else None, dtype=dtype
    )


@main.command(short_help="Merge adapters into GGUF files for llama.cpp and Ollama, with a model card.")
@config_option_with(
    "YAML config (default: the run's config.yaml beside the adapters, else their adapter_config.json's base)."
)
@set_option
@from_adapters_option
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="New folder for the export.")
@click.option(
    "--outtype",
    "outtypes",
    multiple=True,
    default=["f16"],
    show_default=True,
    type=click.Choice(["f16", "bf16", "q8_0", "f32"]),
    help="GGUF weight type (repeatable: one file each, from one merge); f32 is lossless, q8_0 half of f16.",
)
@click.option(
    "--llama-cpp",
    metavar="DIR",
    help="llama.cpp's source, which holds convert_hf_to_gguf.py (default: $LLAMA_CPP_DIR).",
)
@_stops_on_signals("nothing was written", "rerun the same command")
def export(config_path, overrides, adapters, out_dir, outtypes, llama_cpp):
    """Merge adapters and write GGUF files for llama.cpp, Ollama and LM Studio, with an Ollama
    Modelfile and a model card (README.md), into a new folder.

    The conversion is llama.cpp's own (convert_hf_to_gguf.py from its source; the package has no
    converter of its own). The GGUF carries the chat template, with the trained instruction as its
    default system message, and the end-of-turn token; the Modelfile adds greedy decoding and
    eval.max_new_tokens."""
    from samsum_qlora.commands.export import export_gguf
    from samsum_qlora.commands.merge import merge_adapters

    export_gguf(
        adapters,
        out_dir,
        merge=merge_adapters,
        cfg=_config(config_path, overrides) if config_path or overrides else None,
        outtypes=list(outtypes),
        llama_cpp=llama_cpp,
    )


@main.command(short_help="Time training and generation (tokens/s, memory, MFU) against the tutorial.")
@config_option
@set_option
@click.option("--split", default=None, help="Split whose lengths are timed (default: data.train_split).")
@click.option("--steps", type=int, default=20, show_default=True, help="Timed optimizer steps, after warm-up.")
@click.option(
    "--warmup",
    type=int,
    default=None,
    help="Untimed steps first (allocation, kernels, CUDA graphs). Default: one pass over the split's "
    "batches, so every batch shape is met before timing (the tutorial's recipe: 3).",
)
@click.option(
    "--compare",
    type=click.Choice(["tutorial", "seed"]),
    help="Also time the tutorial's recipe in the same process ('seed' is an older name for it).",
)
@click.option("--eval", "with_eval", is_flag=True, help="Also time batched generation against the per-example loop.")
@click.option("--loop-sample", type=int, default=16, show_default=True, help="First prompts the slow loop decodes.")
@click.option(
    "--loop-workers",
    type=int,
    default=1,
    show_default=True,
    help="Processes sharing the loop's prompts (on a GPU); with more than one, the loop's speed is timed "
    "on its first prompts alone, before they start.",
)
@click.option(
    "--epoch-tokens", type=int, default=None, help="Tokens in one epoch for the projection (default: the split's)."
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the figures as JSON here.")
@click.option(
    "--model-dir",
    "--random-model-dir",
    "model_dir",
    type=click.Path(file_okay=False),
    help="Weights to time: a folder holding a model is used as it is (real weights make the "
    "agreement and ROUGE figures meaningful); otherwise the random model is written there.",
)
@click.option(
    "--adapters",
    type=click.Path(file_okay=False),
    help="Trained adapters for --eval (default: random ones with an effect).",
)
@_stops_on_signals("the temporary weights were removed and nothing was written", "rerun the same command")
def bench(
    config_path,
    overrides,
    split,
    steps,
    warmup,
    compare,
    with_eval,
    loop_sample,
    loop_workers,
    epoch_tokens,
    json_path,
    model_dir,
    adapters,
):
    """Time training (real tokens/s, padding, peak memory, MFU, epoch time) and generation on
    model.name's architecture with random weights (no weight download needed), or --model-dir's."""
    from samsum_qlora.commands.bench import BenchPlan, benchmark

    cfg = _config(config_path, overrides)
    if min(steps, 1 if warmup is None else warmup, loop_sample, loop_workers) < 1:
        raise UserError("--steps, --warmup, --loop-sample and --loop-workers must be at least 1")
    if epoch_tokens is not None and epoch_tokens < 1:
        raise UserError(f"--epoch-tokens must be at least 1 (the tokens in one epoch), got {epoch_tokens}")
    plan = BenchPlan(
        split=split or cfg.data.train_split,
        steps=steps,
        warmup=warmup,
        compare_tutorial=compare is not None,
        with_eval=with_eval,
        loop_sample=loop_sample,
        loop_workers=loop_workers,
        epoch_tokens=epoch_tokens,
        json_path=Path(json_path) if json_path else None,
        model_dir=Path(model_dir) if model_dir else None,
        adapters=Path(adapters) if adapters else None,
    )
    benchmark(cfg, plan)


if __name__ == "__main__":
    main()
