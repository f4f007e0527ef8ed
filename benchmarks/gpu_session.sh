#!/usr/bin/env bash
# The GPU checks of issues 15 and 19 (and of the NF4/INT8 base weights, the sampling change cache and
# TREAD token routing) in one call of the device tool (a bare H100/H200 machine):
#   bash benchmarks/gpu_prepare.sh        # here, once: .gpu/site with sdcore, plugins, diffusers, bitsandbytes
#   device run, carry [".gpu"]:  bash benchmarks/gpu_session.sh [BUDGET_SECONDS] [CHECK ...]
# Each check runs in its own process with its own time limit, in priority order, inside one total
# budget (a check that no longer fits is skipped and says so); logs go to $OUT (or benchmarks/out/gpu).
set -u
cd "$(dirname "$0")/.."
budget=${1:-430}
shift || true
checks=${*:-flux_fp8 flux_offload flux_nf4 sample_cache flux_int8 tread flux_precision flux_bf16 probe precision train_sdxl train_sd15}
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
# Limits (seconds), set before any FLUX.1-size step had run (the first ran on 2026-12-04: each Flux check ended in
# 23-35 s, RESULTS.md); the reasoning behind them:
# - A Flux process's fixed part: imports + CUDA start (~10 s in the first session: gpu_precision's fp32
#   row 15.4 s against 5.8 s), 12B random bf16 weights made and converted on the device (seconds: the
#   conversion is elementwise), the first step's kernel selection: ~40 s together.
# - A bf16 step (1024 px, 4608 tokens, checkpointing: forward, recompute, backward) is ~4e14 FLOP,
#   ~1 s on an H200. Dequantising per op is memory-bound: nf4 touches ~38 bytes an element (unpack to
#   int64, gather, scale, cast), int8 ~19, fp8 ~3, three passes a step over 12B elements at ~3.5 TB/s:
#   +0.4 s (nf4), +0.2 s (int8). The CPU dry runs bound it from above (--size mid --device cpu
#   --steps 3, 2 cores: none 1.72, fp8 2.21, nf4 3.45, int8 3.13 s/step: nf4 2.0x, int8 1.8x bf16).
# - So flux_nf4 / flux_int8 (2 steps) should end in ~45-60 s, flux_bf16's 90 s for 2 steps plus the
#   conversion and at most 2x slower steps; limits with ~2x margin: 110 and 100.
# - sample_cache (sd15_512, bf16, 4 algorithms, each 2 x (1 warm-up + 2 timed) + 2 compared runs of
#   20 batch-2 UNet forwards): ~20 s of imports and CUDA start, ~5 s to build each bundle, and at the
#   first session's SD1.5 512 px speed (195 ms a batch-1 training step: ~60-100 ms a batch-2 forward
#   with adapters) ~10-16 s of forwards per algorithm: ~85-105 s; its table prints only at the end,
#   so a cut-off run shows nothing, and the limit errs high: 120.
# With flux_fp8's 150 and flux_offload's 40 the first four caps sum to 420 s, inside the 430 s budget; a
# fifth runs only on what they leave (a check is skipped under 30 s left and says so). flux_fp8 runs
# first: it is issue 19's check.
# - flux_offload (--cpu-offload-checkpointing, <= 40 s): 12 FLUX.1 blocks (2.5B bf16 weights, made on the
#   device) at 1024 px, 2 steps with plain checkpointing then 2 with the offload in one process: ~15 s of
#   imports and CUDA start, ~1 s a step (the offload adds ~0.3 GB of copies each way), the rest setup.
# - tread (<= 120 s): TREAD token routing on FLUX.1-dev's transformer (bf16 weights made on the device, sdcore's
#   rank-16 LoRA, 1024 px: 4608 image + 512 text tokens, no checkpointing: ~55 GB of activations plain), a step
#   without routes and with 0.5:2:-2 and 0.25:2:-2 interleaved: per variant 1 sanity forward, 1 warm-up, 3 timed
#   and 1 memory step, ~1 s a plain step: ~20 s of steps, ~40 s of imports, CUDA start and weights; the table
#   prints at the end, so the limit errs high. It runs after flux_int8, on what the first five leave.
declare -A limit=([tread]=120 [flux_offload]=40 [probe]=150 [flux_fp8]=150 [flux_nf4]=110 [sample_cache]=120 [flux_int8]=100 [flux_precision]=60 [precision]=110 [train_sd15]=120 [train_sdxl]=160 [flux_bf16]=90)
command_of() {
  case $1 in
    probe) echo "python3 benchmarks/gpu_sdpa_probe.py --json $out/probe.json" ;;
    flux_fp8) echo "python3 benchmarks/gpu_flux_memory.py --json --sdpa $sdpa" ;;
    flux_nf4) echo "python3 benchmarks/gpu_flux_memory.py --base-weights-dtype nf4 --steps 2 --json --sdpa $sdpa" ;;
    flux_int8) echo "python3 benchmarks/gpu_flux_memory.py --base-weights-dtype int8 --steps 2 --json --sdpa $sdpa" ;;
    flux_offload) echo "python3 benchmarks/gpu_flux_memory.py --size stack --no-fp8 --steps 2 --compare-offload --json --sdpa $sdpa" ;;
    flux_bf16) echo "python3 benchmarks/gpu_flux_memory.py --no-fp8 --steps 2 --json --sdpa $sdpa" ;;
    tread) echo "python3 -m benchmarks tread -- --device cuda --dtype bf16 --sizes flux_dev --steps 3 --sdpa $sdpa" ;;
    sample_cache) echo "python3 -m benchmarks sample_cache -- --device cuda --sizes sd15_512 --dtype bf16 --steps 20 --repeat 2" ;;
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
  grep -E "peak|estimate|^weights as stored|^step [0-9]+:|^## [0-9]+ denoising|^size +algo|^sd15|^sdxl|size +ours|^(sd15_512|sdxl) |_precisions|memory_options|dreambooth|^attention|^flux blocks|^offload:|^flux_dev|routed/plain|Error|error" "$out/$name.log" | grep -v '^ ' | tail -12
done
echo "== total $(($(date +%s) - start)) s"
