#!/usr/bin/env bash
# MODEL=<SmolLM2-135M-Instruct folder or Hub id> SAMSUM=<folder with validation.csv and test.csv> \
#   RUNS=<output folder> bash docs/quality-runs.sh [base default tutorial select best bench]
#
# The runs behind docs/quality.md, on one GPU. Every row trains on the same 818 SAMSum validation
# dialogues and scores the same 819 test dialogues, once. The best recipe is chosen on 150
# validation dialogues held out from a training set of the other 668, never on the test split.
# Each stage skips what a previous run of it finished, so a stopped run continues where it was.
set -euo pipefail
: "${MODEL:?}" "${SAMSUM:?}" "${RUNS:?}"
stages=${*:-base default tutorial select best bench}
q=(python3 -m samsum_qlora)
mkdir -p "$RUNS"

# --- the data: full = train on all 818 validation rows, score test; select = 668 / 150 held out ---
python3 - "$SAMSUM" "$RUNS/data" <<'EOF'
import csv, pathlib, sys
src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
read = lambda name: list(csv.DictReader((src / name).open(newline="", encoding="utf-8")))
val, test = read("validation.csv"), read("test.csv")
def write(folder, split, rows):
    (out / folder).mkdir(parents=True, exist_ok=True)
    with (out / folder / f"{split}.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0])); w.writeheader(); w.writerows(rows)
write("full", "train", val); write("full", "test", test)
write("select", "train", val[:668]); write("select", "test", val[668:])
EOF

# shellcheck disable=SC2206  # EXTRA: more --set options for every command (a quick trial: max_steps, limit)
extra=(${EXTRA:-})
full=(--set "model.name=$MODEL" --set "data.source=$RUNS/data/full" "${extra[@]}")
select=(--set "model.name=$MODEL" --set "data.source=$RUNS/data/select" "${extra[@]}")
epochs3=(--set train.num_train_epochs=3)
tutorial=(--set train.max_tokens_per_batch=null --set train.per_device_train_batch_size=4
          --set train.gradient_accumulation_steps=4 --set train.optim=paged_adamw_8bit --set lora.lora_dropout=0.05)
all_linear='lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]'
# the candidates for the best recipe, chosen on the held-out dialogues
declare -A candidates=(
  [r16-all-2048-lr2e-4-5ep]="--set lora.lora_r=16 --set lora.lora_alpha=32 --set $all_linear --set train.max_tokens_per_batch=2048 --set train.num_train_epochs=5"
  [r32-all-2048-lr4e-4-5ep]="--set lora.lora_r=32 --set lora.lora_alpha=64 --set $all_linear --set train.max_tokens_per_batch=2048 --set train.num_train_epochs=5 --set train.learning_rate=4e-4 --set lora.lora_dropout=0.05"
)

train() {  # train NAME ARGS...: skipped when NAME's adapters are there
  local name=$1; shift
  [ -d "$RUNS/$name/lora_adapters" ] || "${q[@]}" train --set "train.output_dir=$RUNS/$name" "$@"
}
score() {  # score NAME ARGS...: the test split (or held-out rows) with NAME's adapters
  local name=$1; shift
  "${q[@]}" eval --set "train.output_dir=$RUNS/$name" "$@"
}

for stage in $stages; do
  echo "=== $stage ==="
  case $stage in
    base)  # the base model as it is, with the 4-bit base and in bf16
      score base-4bit "${full[@]}" --base-only
      score base-bf16 "${full[@]}" --base-only --set quantization.load_in_4bit=false ;;
    default)  # the package's defaults, three epochs
      train default "${full[@]}" "${epochs3[@]}" && score default "${full[@]}" ;;
    tutorial)  # the tutorial's learning settings (16 rows per step, dropout 0.05, paged 8-bit AdamW)
      train tutorial "${full[@]}" "${epochs3[@]}" "${tutorial[@]}" && score tutorial "${full[@]}" ;;
    select)
      for name in "${!candidates[@]}"; do
        # shellcheck disable=SC2086
        train "select-$name" "${select[@]}" ${candidates[$name]} && score "select-$name" "${select[@]}"
      done ;;
    best)  # the candidate with the best mean ROUGE on the held-out rows, trained on all 818
      best=$(python3 - "$RUNS" <<'EOF'
import json, pathlib, sys
runs = pathlib.Path(sys.argv[1])
scored = {p.parent.parent.name.removeprefix("select-"): json.loads(p.read_text())
          for p in runs.glob("select-*/eval/metrics.json")}
print(max(scored, key=lambda n: sum(scored[n][k] for k in ("rouge1", "rouge2", "rougeL"))))
EOF
)
      echo "best on the held-out rows: $best" | tee "$RUNS/best.txt"
      # shellcheck disable=SC2086
      train best "${full[@]}" ${candidates[$best]} && score best "${full[@]}" ;;
    bench)  # eval's generation against the tutorial's per-example loop on the first 200 test dialogues,
      # with the adapters of BENCH_RUN (default: best); the loop's outputs come from 14 processes at once
      "${q[@]}" bench "${full[@]}" --split test --model-dir "$MODEL" --adapters "$RUNS/${BENCH_RUN:-best}/lora_adapters" \
        --eval --loop-sample 200 --loop-workers "${LOOP_WORKERS:-14}" --steps 5 --warmup 3 \
        --json "$RUNS/bench-smollm2.json" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
