#!/usr/bin/env bash
# Issue 14's GPU work, ready to run on a GPU box from the repo root (torch with CUDA installed there):
#   benchmarks/gpu_issue14.sh check OUT_DIR   # attention exactness + kernel timings + 28M MFU (~1-2 min, H100)
#   benchmarks/gpu_issue14.sh study OUT_DIR   # the CPU recipe study's runs (< 4 min: --time-limit 210 s)
#   benchmarks/gpu_issue14.sh all OUT_DIR     # both, one after the other
# The TinyStories sample must be there: TINYSTORIES_SAMPLE_DIR=folder holding train-head.txt (default
# ../shared/data/tinystories). Results: OUT_DIR/gpu-attention-check.txt, OUT_DIR/report.md, OUT_DIR/results.json.
set -uo pipefail
what=${1:?usage: $0 check|study|all OUT_DIR}
out=${2:?usage: $0 check|study|all OUT_DIR}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$out"
status=0
if [[ $what == check || $what == all ]]; then
    timeout 170 python3 benchmarks/gpu_attention_check.py 2>&1 | tee "$out/gpu-attention-check.txt" || status=1
fi
if [[ $what == study || $what == all ]]; then
    python3 benchmarks/cpu_recipe_study.py run "$out" --work /tmp/cpu-recipe-study \
        --speeds benchmarks/cpu-recipe-speeds.json --device cuda --workers 12 --time-limit 210 || status=1
fi
exit $status
