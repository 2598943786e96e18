"""Time what a careful user would pick instead of samsum-qlora, on the same job, for docs/performance.md.

    python3 docs/peers.py --model-dir DIR --data DIR --setting SETTING [--warmup 25 --steps 10] [--json FILE]

The job is `samsum-qlora bench`'s: the model in --model-dir (e.g. the random Llama-3.2-1B shape that
`samsum-qlora bench --model-dir DIR` writes), the SAMSum rows of DIR/test.csv, the task instruction and
dialogue as the prompt and the summary as the completion, an NF4 double-quantised base in bf16,
LoRA r=8 (alpha 16) on q/k/v/o, bf16 autocast, fused AdamW, loss on the completion only.

- `padded`: TRL's SFTTrainer, 16 rows per step padded to the longest, liger-kernel on: the fastest
  TRL setting that computes the same loss as samsum-qlora (every row attends to itself only).
- `packed`: TRL's best-fit-decreasing packing into 4,096-token rows, its fastest setting at all;
  under SDPA the packed rows attend to each other, so its loss is not the same.
- `unsloth`: Unsloth's FastLanguageModel (its 4-bit base, its LoRA kernels) and its patched
  SFTTrainer at its defaults, 16 rows per step: padding-free batches whose rows attend to
  themselves only (the same loss).
- `unsloth-packed`: the same with `packing=True` into 4,096-token rows.

The peers are installed for this script only (`pip install trl==1.16.0`; Unsloth 2026.10.9 wants
`trl<=1.15` and `transformers<=5.17`, so give it its own environment); none is a dependency of the
package.
Real tokens/s are timed like bench times them: CUDA events at the end of each step, steps after the
warm-up, non-padding tokens of those steps.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

INSTRUCTION = "Summarize the following dialogue in one or two sentences."
SETTINGS = ["padded", "packed", "unsloth", "unsloth-packed"]
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def clock(counts: list[int]):
    """A callback marking the end of every optimizer step with a CUDA event (bench's way of timing)
    and how many batches had been collated by then (`counts` holds each batch's real tokens)."""
    import torch
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_step_end(self, args, state, control, **kwargs):
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((event, len(counts)))

    return Clock()


def rows(data: Path) -> list[dict]:
    with (data / "test.csv").open(newline="", encoding="utf-8") as f:
        return [
            {
                "prompt": [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": r["dialogue"]}],
                "completion": [{"role": "assistant", "content": r["summary"]}],
            }
            for r in csv.DictReader(f)
            if r["dialogue"].strip() and r["summary"].strip()
        ]


def trl_model(model_dir: str):
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quant, dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    return model, tokenizer, LoraConfig(**LORA)


def unsloth_model(model_dir: str):
    import torch
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_dir, max_seq_length=4096, dtype=torch.bfloat16, load_in_4bit=True, local_files_only=True
    )
    model = FastLanguageModel.get_peft_model(model, **LORA, bias="none", use_gradient_checkpointing=False)
    return model, tokenizer, None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--setting", choices=SETTINGS, required=True)
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", type=Path)
    a = p.parse_args()

    unsloth = a.setting.startswith("unsloth")
    # Unsloth patches transformers, peft and TRL as it is imported: it comes first
    model, tokenizer, lora = (unsloth_model if unsloth else trl_model)(a.model_dir)
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer.pad_token = tokenizer.pad_token or "<|finetune_right_pad_id|>"
    packed = a.setting.endswith("packed")
    config = SFTConfig(
        output_dir="/tmp/peers-out",
        max_steps=a.warmup + a.steps,
        per_device_train_batch_size=1 if packed else 16,
        packing=packed,
        max_length=4096 if packed else 1024,
        completion_only_loss=True,
        use_liger_kernel=not unsloth,  # Unsloth brings its own kernels
        bf16=True,
        optim="adamw_torch_fused",
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        gradient_accumulation_steps=1,  # Unsloth's SFTConfig would make it 2
        gradient_checkpointing=False,
        dataloader_num_workers=0,
    )
    counts: list[int] = []
    timer = clock(counts)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows(a.data)),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[timer],
    )
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        mask = batch.get("attention_mask")  # padding-free and packed batches have none: all real
        counts.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    (start, start_batches), (end, end_batches) = timer.marks[a.warmup - 1], timer.marks[-1]
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000
    tokens = sum(counts[start_batches:end_batches])  # the batches of the timed steps, however many per step
    result = {
        "setting": a.setting,
        "tokens_per_s": round(tokens / seconds, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "timed_steps": a.steps,
        "warmup_steps": a.warmup,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "device": torch.cuda.get_device_name(),
    }
    print(json.dumps(result))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
