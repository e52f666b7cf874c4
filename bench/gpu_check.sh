#!/usr/bin/env bash
# GPU check for an H100 or H200 (under 8 minutes): numerics against transformers on the GPU for a
# small OPT and a SmolLM2-shaped Llama (random weights), then scenario G1 (OPT-13B, 16 GB cap,
# prompt 512, gen 32) with the planner's policy. Needs pulp, msgpack, networkx, gguf installed.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m pytest -q -p no:cacheprovider tests/test_cuda.py
python bench/g1.py --model facebook/opt-13b --cap-gb 16 --prompt-len 512 --gen-len 32
