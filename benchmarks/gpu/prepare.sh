#!/usr/bin/env bash
# Packs everything the GPU benchmark needs into parts of at most 58 MB (../shared/gpu/README.md):
# MLX + its CUDA backend + mlx-whisper (make-parts.sh), the wheels our code and the benchmark import
# that the GPU machine lacks, the multilingual base model converted to MLX (float16, as shipped),
# the benchmark audio, and a copy of engine/, archive_asr/ and benchmarks/.
# usage: bash benchmarks/gpu/prepare.sh [OUTDIR]     (default .gpu, git-ignored)
# Then follow the device steps printed at the end (benchmarks/gpu/run_on_device.sh runs the benchmark).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
shared=${SHARED_DIR:-$(cd "$repo/.." && pwd)/shared}
out=${1:-$repo/.gpu}
python=${PYTHON:-$repo/.venv/bin/python}
stage=$(mktemp -d); trap 'rm -rf "$stage"' EXIT

# 1. the base model as an MLX folder (config.json + weights.safetensors + archive_asr.json)
mkdir -p "$stage/models"
ARCHIVE_ASR_DATA_DIR="$stage/data" ARCHIVE_ASR_MODELS_DIR="$stage/models" "$python" -c \
  "import engine; from engine.model_store import resolve_model; print('model:', resolve_model('base'))"
rm -f "$stage"/models/.*.lock

# 2. audio: the 10-minute benchmark file, the ljspeech long file, the short clips (issue 4's clip test)
mkdir -p "$stage/audio/longform"
cp "$shared"/audio/longform/*.flac "$shared"/audio/longform/*.wav "$shared"/audio/longform/*.txt "$stage/audio/longform/"
cp -r "$shared/audio/en" "$shared/audio/multi" "$stage/audio/"

# 3. our code, in case the device's working tree copy is not the one to measure
mkdir -p "$stage/code"
tar cf - -C "$repo" --exclude=__pycache__ --exclude=results engine archive_asr benchmarks | tar xf - -C "$stage/code"

# 4. wheels the GPU machine lacks (it has numpy, numba, scipy, tiktoken, huggingface_hub, tqdm, torch).
#    make-parts.sh downloads with --no-deps, so every import is listed: archive_asr.settings
#    (pydantic-settings and friends, platformdirs), engine.audio (soundfile, soxr), engine.convert
#    (filelock), the benchmark (jiwer -> rapidfuzz, click; whisper-normalizer -> regex;
#    lightning-whisper-mlx, which must not bring its own pins anyway).
export GPU_EXTRA_WHEELS="soundfile soxr cffi pycparser filelock platformdirs pydantic pydantic-core pydantic-settings \
python-dotenv typing-extensions typing-inspection annotated-types jiwer rapidfuzz click regex \
whisper-normalizer==0.1.15 lightning-whisper-mlx==0.0.10"
bash "$shared/gpu/make-parts.sh" "$out" "$stage/models" "$stage/audio" "$stage/code"

n=$(ls "$out"/part* | wc -l)
cat <<MSG

$n parts in $out. Device steps (the lead runs them; one part per call, the machine stays warm):
  for each part NN: run(carry=[".gpu/partNN"], command="mkdir -p /tmp/stage && cp .gpu/partNN /tmp/stage/ && ls /tmp/stage")
  then:             run(command="bash benchmarks/gpu/run_on_device.sh main")   # unpacks, installs, 30-min benchmark
  then:             run(command="bash benchmarks/gpu/run_on_device.sh extra")  # ljspeech, word timing, 3-hour memory, clips
MSG
