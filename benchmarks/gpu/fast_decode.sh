#!/usr/bin/env bash
# The fast-decode measurement of docs/performance.md in one command (issue 7/8): the device's floors, our default
# path (CUDA graphs) at batch 1, 8 and 32 and our compiled path at batch 1 for every family, transformers'
# Llama-7B (eager and static-compiled) as the peer, and torchao's weight-only int4 against bf16 for the LLaMA-based
# families (needs `pip install torchao`). On a lent machine with a 10-minute limit per call, run it in parts:
# PART=graphs, PART=compile, PART=peer, PART=int4 (default: all four), and PART=check: the tiny trained models on the
# GPU through every decode path against the plain loop (benchmarks/gpu/fast_decode_check.py; not part of "all").
#   PYTHONPATH=src bash benchmarks/gpu/fast_decode.sh [RESULTS_DIR]
set -euo pipefail
results=${1:-benchmarks/results}
families=${FAMILIES:-visualglm,minigpt4-7b,cogvlm,cogvlm2,minigpt4-13b}
tokens=${NEW_TOKENS:-128}
part=${PART:-all}
common=(--new-tokens "$tokens" --floor-copy-bytes 4294967296 --results "$results")
if [[ $part == all || $part == graphs ]]; then
  python -m benchmarks.bench table --families "$families" --caches graphs --batches 1,8,32 "${common[@]}" \
    --note "fast decode: default path (CUDA graphs)"
fi
if [[ $part == all || $part == compile ]]; then
  python -m benchmarks.bench table --families "$families" --caches compile --batches 1 "${common[@]}" \
    --note "fast decode: compiled path"
fi
if [[ $part == all || $part == peer ]]; then
  python -m benchmarks.bench table --families peer --caches dynamic,static --batches 1 "${common[@]}" \
    --note "fast decode: the peer"
fi
if [[ $part == all || $part == int4 ]]; then
  python -m benchmarks.bench quant --families "${INT4_FAMILIES:-minigpt4-7b,cogvlm2,minigpt4-13b}" --modes int4 \
    --batches 1 --new-tokens "$tokens" --results "$results"
fi
if [[ $part == check ]]; then
  python -m benchmarks.gpu.fast_decode_check
fi
