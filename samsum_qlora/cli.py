"""The `samsum-qlora` command. Each command parses options and calls one function; heavy imports
happen inside the commands so `--help` answers at once."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from samsum_qlora.errors import UserError

CONFIG_HELP = "YAML config (default: the shipped Llama 3.2 1B recipe)."
SET_HELP = "Override a config key, e.g. --set train.max_steps=100 (repeatable; beats the YAML)."


class Group(click.Group):
    """Turns our UserError (and click's own usage errors) into one line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


def _config(config_path, overrides):
    from samsum_qlora.config import load_config, parse_overrides

    return load_config(config_path, parse_overrides(overrides))


config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="samsum-qlora")
def main():
    """QLoRA fine-tuning of Llama 3.2 1B-Instruct on SAMSum, and ROUGE evaluation."""


@main.command()
@config_option
@set_option
@click.option("--overwrite", is_flag=True, help="Replace the finished adapters in train.output_dir.")
@click.option("--resume", type=click.Path(), help="Resume from this checkpoint (default: the newest complete one).")
def train(config_path, overrides, overwrite, resume):
    """Train LoRA adapters on a 4-bit base; saves <train.output_dir>/lora_adapters/.

    Rerunning the same command into the same output dir resumes from the newest complete
    checkpoint."""
    from samsum_qlora import train as training

    cfg = _config(config_path, overrides)
    try:
        training.run(cfg, overwrite=overwrite, resume=resume)
    except training.Preempted as e:
        click.echo(f"preempted: {e}", err=True)
        sys.exit(143)  # 128 + SIGTERM, what a job scheduler expects


@main.command(name="eval")
@config_option
@set_option
@click.option("--adapters", type=click.Path(), help="LoRA adapters dir (default: <train.output_dir>/lora_adapters).")
@click.option("--base-only", is_flag=True, help="Score the base model without adapters.")
@click.option("--split", default=None, help="Split to score (default: eval.split, 'test').")
@click.option("--limit", type=int, default=None, help="Score only the first N examples.")
@click.option("--output-dir", type=click.Path(), help="Where metrics.json and predictions.jsonl go.")
@click.option("--overwrite", is_flag=True, help="Replace an output dir that holds another evaluation.")
def evaluate_cmd(config_path, overrides, adapters, base_only, split, limit, output_dir, overwrite):
    """Generate summaries in batches and score them with ROUGE."""
    from samsum_qlora import evaluate

    cfg = _config(config_path, overrides)
    plan = evaluate.plan_eval(cfg, adapters=adapters, base_only=base_only, split=split, limit=limit,
                              output_dir=output_dir)
    evaluate.run_eval(cfg, plan, overwrite=overwrite)


@main.command()
@config_option
@set_option
@click.option("--split", default="train", show_default=True, help="Split to tokenise.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Where save_to_disk writes.")
@click.option("--show", type=int, default=0, help="Print N examples with the trained tokens marked.")
def preprocess(config_path, overrides, split, out_dir, show):
    """Tokenise a split exactly as training does and save it (needs only the tokenizer).

    With --show N, prints N examples; the tokens the loss is computed on are shown between
    ⟦ and ⟧ (and in green on a terminal)."""
    from samsum_qlora import preprocess as prep

    cfg = _config(config_path, overrides)
    prep.run(cfg, split=split, out_dir=Path(out_dir), show=show)


if __name__ == "__main__":
    main()
