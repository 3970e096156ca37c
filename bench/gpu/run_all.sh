#!/usr/bin/env bash
# Issue 6's GPU measurements, in two device calls of under 10 minutes each (a session has 30 device-minutes,
# a machine start included; the machine goes back after 30 s idle, so issue call 2 right after call 1).
#
#   here, once:   bash bench/gpu/prepare_carry.sh            # wheels + data into .gpu_carry/ (git-ignored)
#   call 1:       run(command="bash bench/gpu/run_all.sh 1", carry=[".gpu_carry"], timeout_s=600)
#                 training speed vs transformers (target 1), decoding vs transformers (target 3)   ~7 min
#   call 2:       run(command="bash bench/gpu/run_all.sh 2", carry=[".gpu_carry"], timeout_s=600)
#                 largest micro-batch (target 4), loss curves (target 1), Tiny Shakespeare (target 2)  ~8 min
#
# Each benchmark runs under its own time limit, so one that overruns does not cost the others; its log
# (ending with the markdown rows for docs/benchmarks.md) lands in $OUT, which the device tool brings back.
# Budgets are estimates from docs/gpu.md; an entry that hits its limit says so in its log.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-bench/gpu/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -d .gpu_carry/wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu_carry/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -d .gpu_carry/tiktoken_cache ] && export TIKTOKEN_CACHE_DIR=$PWD/.gpu_carry/tiktoken_cache
data=${DATA:-.gpu_carry/data}
smoke=${SMOKE:+--smoke}  # SMOKE=1 DATA=... bash bench/gpu/run_all.sh 1: every command on the CPU, tiny, to check them

bench() {  # bench NAME SECONDS COMMAND...: run under a time limit, log to $out/NAME.log, carry on if it fails
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee "$out/$name.log"
  SECONDS=0
  timeout -k 10 "$limit" "$@" $smoke 2>&1 | tee -a "$out/$name.log"
  echo "=== $name: exit ${PIPESTATUS[0]} after ${SECONDS}s (124 = time limit)" | tee -a "$out/$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv || true
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$out/device.txt"

case "${1:-}" in
1)
  # 3 compiles (ours at 16 and 64, transformers at 16) of ~1 min each, plus a profile of ours at 16.
  bench train_speed 330 python3 bench/gpu/bench_train_gpu.py speed --batches 16 64 --hf-batches 16 --profile
  # transformers' generate is the slow side (~20 tok/s at batch 1 in the issue: 13 s per call).
  bench decode 200 python3 bench/gpu/bench_decode_gpu.py --batches 1 16 --runs 2 --profile
  ;;
2)
  bench memory_gpt2 140 python3 bench/gpu/bench_train_gpu.py memory --presets gpt2 --time-budget-s 55
  bench memory_gpt2xl 160 python3 bench/gpu/bench_train_gpu.py memory --presets gpt2-xl --time-budget-s 60
  bench curve 140 python3 bench/gpu/bench_curve_gpu.py --data $data/realtext.txt --micro-batch 8
  bench shakespeare 130 python3 bench/gpu/bench_shakespeare_gpu.py --data $data/tinyshakespeare.txt \
    --variant "b256: --train.micro_batch_size 256 --train.lr 3e-3 --train.max_steps 600" \
    --variant "muon: --train.optimizer muon --train.max_steps 700"
  ;;
*)
  echo "usage: bash bench/gpu/run_all.sh 1|2   (see the comments at the top)" >&2
  exit 2
  ;;
esac
