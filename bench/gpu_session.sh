#!/usr/bin/env bash
# The benchmarks' GPU settings in one command, for a lent GPU machine with little time: each
# step has its own time limit and writes its JSON and log into OUT, so that a step that fails
# or runs out of time costs only itself.
#
#   here:   mkdir -p bench/out/gpu_data && cp -r "$BLOB_LORA_DATA/arc_easy" bench/out/gpu_data/
#   there:  bash bench/gpu_session.sh OUT [STEP ...]       (carry bench/out/gpu_data)
#
# Steps (default: all, in this order): factors (bench/inducing_factors.py, ~30 s), train
# (train_step.py --setting gpu, every method, ~2 min), eval (eval_cost.py --setting gpu,
# ~2 min; needs ARC-Easy under bench/out/gpu_data), predictive (predictive.py --setting gpu,
# ~1 min). The machine's image must hold torch, transformers, peft, accelerate, torchmetrics,
# matplotlib and psutil (the lent H200's does); the model is built from a config there.
# Memory: the eval step keeps every method's 7B-shaped model alive at once (5 x 13.5 GB of bf16
# weights: 67.5 GB = 62.9 GiB before its passes, a 71.7 GB = 66.8 GiB peak during them on the
# H200, eval_cost_gpu_pinned.json), which alone fits an H100's ~79 GiB; but it trains the last
# method beside the other four, a peak never measured: ask for the H200, or on an H100 run
# eval_cost.py yourself with fewer --methods per call (lora and one or two others).
set -u
out=${1:?usage: bench/gpu_session.sh OUT [factors|train|eval|predictive ...]}
shift
steps=${*:-factors train eval predictive}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=src BLOB_LORA_DATA=${BLOB_LORA_DATA:-bench/out/gpu_data}
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"

step() {  # step NAME SECONDS COMMAND...: run with a limit, keep the log, report the status
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "$name: exit $? ($(date +%T))"
    grep -v "it/s\|s/it\|Warning\|warnings.warn" "$out/$name.log" | tail -25
}

for s in $steps; do
    case $s in
    factors) step factors 120 python3 bench/inducing_factors.py --out "$out/inducing_factors_gpu.json" ;;
    train) step train 300 python3 bench/train_step.py --setting gpu --out "$out/train_step_gpu.json" ;;
    eval) step eval 300 python3 bench/eval_cost.py --setting gpu --repeats 3 --out "$out/eval_cost_gpu.json" ;;
    predictive) step predictive 240 python3 bench/predictive.py --setting gpu --out "$out/predictive_gpu.json" ;;
    *) echo "unknown step $s" >&2 ;;
    esac
done
