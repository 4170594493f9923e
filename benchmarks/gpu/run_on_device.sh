#!/usr/bin/env bash
# Runs on the GPU machine from the repo root, after the parts of prepare.sh are in /tmp/stage/.
# usage: bash benchmarks/gpu/run_on_device.sh main|extra
#   main : base float16 on the 10-minute file repeated 3 times (30 min): every method, 3 timed runs
#   extra: the ljspeech long file; word timing vs mlx-whisper (10-minute file); 3-hour memory; 200 clips
# Results: printed, and JSON under $OUT (the device tool brings $OUT back).
set -euo pipefail
mode=${1:-main}
if [ ! -d /tmp/site/mlx ]; then
  (cd /tmp/stage && mkdir -p x && cat part* | tar xf - -C x && bash x/install-on-device.sh)
fi
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
x=/tmp/stage/x/extra
export ARCHIVE_ASR_DATA_DIR=/tmp/archive-asr-data ARCHIVE_ASR_MODELS_DIR=$x/models
out=${OUT:-/tmp/bench-out}; mkdir -p "$out"
code=.
[ -f benchmarks/bench_engine.py ] || code=$x/code
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
bench() { python3 "$code/benchmarks/bench_engine.py" --model base "$@" 2>&1 | grep -v '^INFO'; }
long=$x/audio/longform
case "$mode" in
  main)
    bench --audio $long/english_read_mix_concat.flac --repeat 3 --json-out "$out/gpu_base_30min.json"
    ;;
  extra)
    bench --audio $long/ljspeech_LJ001-0001_to_0032_concat.wav --json-out "$out/gpu_base_ljspeech.json"
    bench --audio $long/english_read_mix_concat.flac --runs 1 --methods engine --word-timing \
      --long-s 10800 --clips $x/audio --clips-count 200 --json-out "$out/gpu_base_words_long_clips.json"
    ;;
  *) echo "usage: $0 main|extra" >&2; exit 2 ;;
esac
