#!/usr/bin/env bash
# SHAPE=<folder with the Llama-3.2-1B config and tokenizer> SAMSUM=<folder with SAMSum test.csv> OUT=<folder> \
#   [SHAPE_8B=<folder with the Llama-3.1-8B config>] [UNSLOTH_SITE=<folder with unsloth, unsloth_zoo, trl 1.15>] \
#   bash docs/performance-runs.sh [defaults long graphs-off rope-off four-bit peers eight-b]
#
# The runs behind docs/performance.md, on one GPU, random weights of the shapes (no download), the real
# SAMSum test-split lengths. Every stage writes its JSON into OUT and prints bench's table.
set -euo pipefail
: "${SHAPE:?}" "${SAMSUM:?}" "${OUT:?}"
stages=${*:-defaults long graphs-off rope-off four-bit peers eight-b}
mkdir -p "$OUT"
q=(python3 -m samsum_qlora)
job=(--set "model.name=$SHAPE" --set "data.source=$SAMSUM" --split test --epoch-tokens 3000000 --model-dir "$OUT/model-1b")

for stage in $stages; do
  echo "=== $stage ==="
  case $stage in
    defaults)  # bench as a user first runs it: its own warm-up (one pass over the split's batches), 20 timed steps
      "${q[@]}" bench "${job[@]}" --compare tutorial --json "$OUT/bench-defaults.json" ;;
    long)  # 3 warm-up steps and 60 timed: the pace of a run's first 60 steps, captures and compiles included
      "${q[@]}" bench "${job[@]}" --compare tutorial --warmup 3 --steps 60 --json "$OUT/bench-long.json" ;;
    graphs-off)  # the same step without CUDA graphs (bucketed shapes kept)
      "${q[@]}" bench "${job[@]}" --set train.cuda_graphs=false --json "$OUT/bench-graphs-off.json" ;;
    rope-off)  # transformers' RoPE instead of liger-kernel's
      python3 -c '
import sys
from samsum_qlora import modeling
modeling.FUSED_ROPE = False
from samsum_qlora.commands.cli import main
main(sys.argv[1:])' bench "${job[@]}" --json "$OUT/bench-rope-off.json" ;;
    four-bit)  # the base kept in 4 bits, dequantised at every matmul (what an 8B on a 24 GB card runs)
      "${q[@]}" bench "${job[@]}" --set quantization.dequantize_once=false \
        --json "$OUT/bench-four-bit.json" ;;
    peers)  # TRL's SFTTrainer on the same job (pip install trl==1.16.0 first), then Unsloth in its own site
      for setting in padded packed; do
        python3 "$(dirname "$0")/peers.py" --model-dir "$OUT/model-1b" --data "$SAMSUM" --setting $setting \
          --json "$OUT/peer-trl-$setting.json"
      done
      for setting in unsloth unsloth-packed; do
        [ -n "${UNSLOTH_SITE:-}" ] || { echo "UNSLOTH_SITE unset: Unsloth not run"; break; }
        PYTHONPATH="$UNSLOTH_SITE:${PYTHONPATH:-}" python3 "$(dirname "$0")/peers.py" --model-dir "$OUT/model-1b" \
          --data "$SAMSUM" --setting $setting --json "$OUT/peer-$setting.json" || echo "Unsloth ($setting) failed"
      done ;;
    eight-b)  # the Llama-3.1-8B shape with the defaults on a card of 24 GB (this GPU capped at 24 GiB)
      : "${SHAPE_8B:?}"
      mkdir -p "$OUT/shape-8b" && cp "$SHAPE_8B"/*.json "$OUT/shape-8b/" && cp "$SHAPE"/tokenizer*.json "$OUT/shape-8b/"
      PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 -c '
import sys, torch
torch.cuda.set_per_process_memory_fraction(24 * 2**30 / torch.cuda.get_device_properties(0).total_memory)
from samsum_qlora.commands.cli import main
main(sys.argv[1:])' bench --set "model.name=$OUT/shape-8b" --set "data.source=$SAMSUM" --split test \
        --epoch-tokens 3000000 --model-dir "$OUT/model-8b" --warmup 3 --steps 5 --json "$OUT/bench-8b-24gb.json" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
