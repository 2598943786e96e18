"""llama.cpp against the merged model on real SAMSum rows: the figures in README's "Take it out".

    PYTHONPATH=$PWD:/path/to/llama-cpp-python's/site-packages python docs/gguf-proof.py \\
        --base SMOLLM2_DIR --data SAMSUM_DIR --llama-cpp LLAMA_CPP_SOURCE --out NEW_DIR [--rows 200] [--threads 1]

1. Train SmolLM2-135M-Instruct's adapters with configs/smollm2-cpu-demo.yaml for one epoch on the first
   96 validation dialogues of --data (11 steps; --data has no train split), or take --adapters.
2. Merge them in float32 (merge's code) and summarise the first --rows test dialogues by eval's own
   path, greedy, 64 new tokens: the reference every GGUF is held to.
3. Export f32, f16, bf16 and q8_0 with export's code (llama.cpp's converter).
4. llama.cpp (llama-cpp-python, installed for this script only) summarises the same rows greedily
   from the very prompt ids eval used: identical summaries, ROUGE, the gap to the merged model with
   its paired bootstrap interval, summaries/s with loading included.
5. Where q8_0's divergence comes from: llama.cpp's own quantizer rewrites the f32 GGUF as q8_0 with
   the token embedding (tied to the output layer in SmolLM2) kept at f16, and as f16 with only the
   embedding at q8_0; and the q8_0 file's weights, dequantised by transformers, go through eval's
   float32 path (q8_0 weights without llama.cpp's 8-bit activations).

Everything lands in --out: results.json holds every figure, summaries-*.json llama.cpp's summaries
in the order of eval's predictions.jsonl. A script, not a test: with 400 rows it ran for an hour on
one core of a shared 2-core CPU, and what it yields is a measurement to read, not a pass/fail
(tests/test_export.py holds the pass/fail proof on 50 rows).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import shutil
import time
from pathlib import Path

import torch

from samsum_qlora import gguf_export, modeling
from samsum_qlora.commands import evaluate, export, merge, train
from samsum_qlora.config import load_config
from samsum_qlora.metrics import SHOWN, paired_difference, rouge_per_example

ROOT = Path(__file__).resolve().parents[1]
OUTTYPES = ["f32", "f16", "bf16", "q8_0"]
TRAIN_ROWS = 96  # one epoch of 2,048-token batches: 11 optimizer steps


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="SmolLM2-135M-Instruct's folder")
    p.add_argument("--data", required=True, help="a folder with SAMSum's test.csv and validation.csv")
    p.add_argument("--llama-cpp", required=True, help="llama.cpp's source (its convert_hf_to_gguf.py)")
    p.add_argument("--out", required=True, type=Path, help="a new folder for everything this writes")
    p.add_argument("--adapters", type=Path, help="trained adapters to use instead of training them here")
    p.add_argument("--rows", type=int, default=200, help="the first N test dialogues")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch and llama.cpp")
    return p.parse_args()


def trained_adapters(args) -> Path:
    if args.adapters:
        return args.adapters
    overrides = {
        "model.name": args.base,
        "data.source": args.data,
        "data.train_split": "validation",
        "data.max_train_samples": TRAIN_ROWS,
        "train.num_train_epochs": 1.0,
        "train.output_dir": str(args.out / "run"),
    }
    train.train_adapters(load_config(ROOT / "configs" / "smollm2-cpu-demo.yaml", overrides))
    return args.out / "run" / "lora_adapters"


def eval_config(adapters: Path, model: Path, args):
    """The run's own config (its instruction, its template), scoring `model` in float32."""
    overrides = {
        "model.name": str(model),
        "data.source": args.data,
        "quantization.load_in_4bit": False,
        "quantization.bnb_4bit_compute_dtype": "float32",
        "eval.max_new_tokens": args.max_new_tokens,
        "eval.batch_size": 32,  # longest first; a few batches keep the padded KV cache small on a CPU
    }
    return load_config(adapters.parent / "config.yaml", overrides)


def eval_path(adapters: Path, model: Path, folder: Path, args) -> tuple[list[dict], float]:
    """eval's own greedy summaries of `model` on the first rows, and the seconds they took (loading included)."""
    cfg = eval_config(adapters, model, args)
    started = time.perf_counter()
    evaluate.evaluate_model(cfg, evaluate.plan_eval(cfg, base_only=True, limit=args.rows, output_dir=str(folder)))
    seconds = time.perf_counter() - started
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()], seconds


def requantised(f32_gguf: Path, out: Path, ftype: int, embedding_type: int, threads: int) -> Path:
    """llama.cpp's own quantizer (llama-quantize's library call) from the f32 GGUF, the token
    embedding written as `embedding_type`; tied to the output, it is the output layer too."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, threads
    params.token_embedding_type = params.output_tensor_type = embedding_type
    if llama_cpp.llama_model_quantize(str(f32_gguf).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {f32_gguf} to {out}")
    return out


def dequantised_q8_0(gguf: Path, merged: Path, out: Path) -> Path:
    """The merged model's folder with the q8_0 file's weights, dequantised to float32 by transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.load_state_dict(from_gguf.state_dict())  # strict: every weight comes from the GGUF
    shutil.copytree(merged, out)  # its tokenizer and chat template
    model.save_pretrained(out)
    return out


def scored(texts: list[str], records: list[dict], seconds: float) -> dict:
    """ROUGE of `texts`, how many equal the merged model's, and the ROUGE-1 gap with its interval."""
    references = [r["reference"] for r in records]
    ours = rouge_per_example([r["prediction"] for r in records], references)
    theirs = rouge_per_example(texts, references)
    gap = paired_difference(theirs["rouge1"], ours["rouge1"])
    return {
        "identical": sum(a == r["prediction"] for a, r in zip(texts, records)),
        "rows": len(records),
        **{k: round(100 * sum(theirs[k]) / len(texts), 2) for k, _ in SHOWN},
        "rouge1_gap": round(100 * gap["mean"], 2),
        "rouge1_gap_95": [round(100 * gap["low"], 2), round(100 * gap["high"], 2)],
        "summaries_per_second": round(len(texts) / seconds, 2),
    }


def show(name: str, row: dict) -> None:
    print(
        f"{name:<34} identical {row['identical']:>3} of {row['rows']}  ROUGE-1/2/L {row['rouge1']:.2f} "
        f"{row['rouge2']:.2f} {row['rougeL']:.2f}  gap {row['rouge1_gap']:+.2f} {row['rouge1_gap_95']}  "
        f"{row['summaries_per_second']:.2f} summaries/s",
        flush=True,
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True)
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": {}}

    # --- the adapters, the float32 merge and its summaries by eval's own path ---
    adapters = trained_adapters(args)
    merge.merge_adapters(adapters, args.out / "merged", dtype="float32")
    records, seconds = eval_path(adapters, args.out / "merged", args.out / "eval-merged", args)
    results["merged"] = scored([r["prediction"] for r in records], records, seconds)
    show("merged (eval's path, float32)", results["merged"])

    # --- the GGUFs, by export's code ---
    ggufs = args.out / "gguf"
    info = export.export_gguf(adapters, ggufs, merge=merge.merge_adapters, outtypes=OUTTYPES, llama_cpp=args.llama_cpp)
    results["gguf_bytes"] = info["gguf"]

    # --- llama.cpp summarises each, and q8_0's variants by llama.cpp's own quantizer ---
    import llama_cpp

    f32 = ggufs / "model-f32.gguf"
    files = {f"llama.cpp {t}": ggufs / gguf_export.gguf_name(t) for t in OUTTYPES}
    variants = args.out / "variants"
    variants.mkdir()
    q8, f16, emb_f16, emb_q8 = (
        llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
        llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
        llama_cpp.GGML_TYPE_F16,
        llama_cpp.GGML_TYPE_Q8_0,
    )
    files["llama.cpp q8_0, embedding f16"] = requantised(f32, variants / "q8_0-emb-f16.gguf", q8, emb_f16, args.threads)
    files["llama.cpp f16, embedding q8_0"] = requantised(f32, variants / "f16-emb-q8_0.gguf", f16, emb_q8, args.threads)
    fmt = modeling.chat_format(eval_config(adapters, args.out / "merged", args))
    dialogues = [r["dialogue"] for r in records]
    for name, path in files.items():
        started = time.perf_counter()
        texts = gguf_export.llama_cpp_summaries(path, fmt, dialogues, args.max_new_tokens, threads=args.threads)
        results["rows"][name] = scored(texts, records, time.perf_counter() - started) | {"bytes": path.stat().st_size}
        (args.out / f"summaries-{path.stem}.json").write_text(json.dumps(texts, indent=0))  # row by row, as eval's
        show(name, results["rows"][name])
        (args.out / "results.json").write_text(json.dumps(results, indent=2))

    # --- q8_0's weights without llama.cpp's arithmetic: dequantised, through eval's float32 path ---
    model = dequantised_q8_0(ggufs / "model-q8_0.gguf", args.out / "merged", args.out / "q8_0-dequantised")
    texts, seconds = eval_path(adapters, model, args.out / "eval-q8_0-dequantised", args)
    results["rows"]["q8_0 weights, eval's float32 path"] = scored([t["prediction"] for t in texts], records, seconds)
    show("q8_0 weights, eval's float32 path", results["rows"]["q8_0 weights, eval's float32 path"])
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
