#!/usr/bin/env bash
# The decode engine's GPU checks and tables, for a machine with CUDA (run from the repository root; budget about
# 2-4 minutes, most of it compiling: the compile time of each shape is printed). serve_load needs the package's
# serving dependencies (fastapi, uvicorn, pydantic) installed there.
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
python benchmarks/engine_gpu_check.py --preset 8M --max-batch 16
python benchmarks/generate_throughput.py --device cuda --presets 1M 8M --batches 1 8 --rounds 2
python benchmarks/serve_load.py --device cuda --compile on --presets 8M 28M --clients 1 16 64 --seconds 5
