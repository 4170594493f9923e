#!/usr/bin/env bash
# What benchmarks/bench_engine.py needs beyond archive-asr itself, into the given venv (default .venv):
# jiwer (WER), whisper-normalizer (Whisper's English text normaliser, no torch), and
# lightning-whisper-mlx 0.0.10 with --no-deps (it pins an old tiktoken and torch but runs with current ones).
set -euo pipefail
venv=${1:-.venv}
"$venv/bin/python" -m pip install -q 'jiwer>=3' 'whisper-normalizer==0.1.15'
"$venv/bin/python" -m pip install -q --no-deps 'lightning-whisper-mlx==0.0.10'
echo "benchmark dependencies installed into $venv"
