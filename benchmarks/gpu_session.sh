#!/usr/bin/env bash
# The GPU checks of issues 15 and 19 in one call of the device tool (a bare H100/H200 machine):
#   bash benchmarks/gpu_prepare.sh        # here, once: .gpu/site with sdcore, plugins, diffusers, bitsandbytes
#   device run, carry [".gpu"]:  bash benchmarks/gpu_session.sh [BUDGET_SECONDS] [CHECK ...]
# Each check runs in its own process with its own time limit, in priority order, inside one total
# budget (a check that no longer fits is skipped and says so); logs go to $OUT (or benchmarks/out/gpu).
set -u
cd "$(dirname "$0")/.."
budget=${1:-430}
shift || true
checks=${*:-flux_fp8 flux_precision flux_bf16 probe precision train_sdxl train_sd15}
out=${OUT:-benchmarks/out/gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD/.gpu/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export SDCORE_CACHE_DIR=/tmp/sdcore-cache TOKENIZERS_PARALLELISM=false
start=$(date +%s)
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, torch, diffusers, transformers, accelerate, peft, sdcore; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__)"
  python3 -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)" 2>&1 | tail -1
  python3 -m sdcore --version
} >"$out/env.log" 2>&1
cat "$out/env.log"

sdpa=no-cudnn  # as the runtime trains (sdcore.train.attention); the probe compares the kernels
declare -A limit=([probe]=150 [flux_fp8]=150 [flux_precision]=60 [precision]=110 [train_sd15]=120 [train_sdxl]=160 [flux_bf16]=90)
command_of() {
  case $1 in
    probe) echo "python3 benchmarks/gpu_sdpa_probe.py --json $out/probe.json" ;;
    flux_fp8) echo "python3 benchmarks/gpu_flux_memory.py --json --sdpa $sdpa" ;;
    flux_bf16) echo "python3 benchmarks/gpu_flux_memory.py --no-fp8 --steps 2 --json --sdpa $sdpa" ;;
    flux_precision) echo "python3 benchmarks/gpu_precision.py --only flux_memory_options --sdpa $sdpa" ;;
    precision) echo "python3 benchmarks/gpu_precision.py --json $out/precision.json" ;;
    train_sd15) echo "python3 -m benchmarks train -- --device cuda --mixed-precision bf16 --sizes sd15_512 --images 8 --epochs 2" ;;
    train_sdxl) echo "python3 -m benchmarks train -- --device cuda --mixed-precision bf16 --sizes sdxl --images 8 --epochs 2" ;;
  esac
}
for name in $checks; do
  left=$((budget - ($(date +%s) - start)))
  allowed=${limit[$name]}
  ((allowed > left)) && allowed=$left
  if ((allowed < 30)); then
    echo "== $name: skipped ($left s of the budget left)"
    continue
  fi
  t0=$(date +%s)
  timeout "$allowed" $(command_of "$name") >"$out/$name.log" 2>&1
  rc=$?
  echo "== $name: rc=$rc in $(($(date +%s) - t0)) s (limit $allowed s)"
  grep -E "peak|estimate|^sd15|^sdxl|size +ours|^(sd15_512|sdxl) |_precisions|memory_options|dreambooth|^attention|^flux blocks|Error|error" "$out/$name.log" | grep -v '^ ' | tail -12
done
echo "== total $(($(date +%s) - start)) s"
