"""Time what a careful user would pick instead of samsum-qlora, on the same job, for docs/performance.md.

    python3 docs/peers.py --model-dir DIR --data DIR --setting padded|packed [--warmup 25 --steps 10] [--json FILE]

The job is `samsum-qlora bench`'s: the model in --model-dir (e.g. the random Llama-3.2-1B shape that
`samsum-qlora bench --model-dir DIR` writes), the SAMSum rows of DIR/test.csv, the task instruction and
dialogue as the prompt and the summary as the completion, an NF4 double-quantised base in bf16,
LoRA r=8 (alpha 16) on q/k/v/o, bf16 autocast, fused AdamW, loss on the completion only.

- `padded`: TRL's SFTTrainer, 16 rows per step padded to the longest, liger-kernel on: the fastest
  TRL setting that computes the same loss as samsum-qlora (every row attends to itself only).
- `packed`: TRL's best-fit-decreasing packing into 4,096-token rows, its fastest setting at all;
  under SDPA the packed rows attend to each other, so its loss is not the same.

TRL is installed for this script only (`pip install trl==1.16.0`); it is no dependency of the package.
Real tokens/s are timed like bench times them: CUDA events at the end of each step, steps after the
warm-up, non-padding tokens of those steps.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

INSTRUCTION = "Summarize the following dialogue in one or two sentences."


class Clock(TrainerCallback):
    def __init__(self):
        self.marks = []

    def on_step_end(self, args, state, control, **kwargs):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.marks.append(event)


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


def main() -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--setting", choices=["padded", "packed"], required=True)
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", type=Path)
    a = p.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(a.model_dir)
    tokenizer.pad_token = tokenizer.pad_token or "<|finetune_right_pad_id|>"
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        a.model_dir, quantization_config=quant, dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    packed = a.setting == "packed"
    config = SFTConfig(
        output_dir="/tmp/peers-out",
        max_steps=a.warmup + a.steps,
        per_device_train_batch_size=1 if packed else 16,
        packing=packed,
        max_length=4096 if packed else 1024,
        completion_only_loss=True,
        use_liger_kernel=True,
        bf16=True,
        optim="adamw_torch_fused",
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        gradient_checkpointing=False,
        dataloader_num_workers=0,
    )
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    clock = Clock()
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows(a.data)),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[clock],
    )
    counts, collate = [], trainer.data_collator

    def counting(features):
        batch = collate(features)
        mask = batch.get("attention_mask")
        counts.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    clock.marks[-1].synchronize()
    seconds = clock.marks[a.warmup - 1].elapsed_time(clock.marks[-1]) / 1000
    tokens = sum(counts[a.warmup : a.warmup + a.steps])
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
