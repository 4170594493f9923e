#!/usr/bin/env bash
# Runs on the GPU machine from the repo root, after the parts of prepare.sh are in /tmp/stage/.
# usage: bash benchmarks/gpu/run_on_device.sh archive|engine|lone|run
#   archive: builds the archive (3.2 h, 91 files), then bench_archive.py: sequential mlx-whisper
#            file by file vs the engine in archive mode, words off and on, and each long file alone
#   engine:  the engine's two methods only, sequential's outputs reused from an earlier archive run
#   lone:    each English long file alone (--lone lengths), the archive run's sequential outputs reused
#   run:     bench_run.py: `archive-asr run` end to end on the same archive (SQLite, embedded Valkey)
# Results: printed, and JSON under $OUT (the device tool brings $OUT back).
set -euo pipefail
mode=${1:-archive}
if [ ! -d /tmp/site/mlx ]; then
  (cd /tmp/stage && mkdir -p x && cat part* | tar xf - -C x && bash x/install-on-device.sh)
fi
export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
x=/tmp/stage/x/extra
export ARCHIVE_ASR_DATA_DIR=/tmp/archive-asr-data ARCHIVE_ASR_MODELS_DIR=$x/models
out=${OUT:-/tmp/bench-out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
archive=/tmp/archive
[ -f $archive/manifest.json ] || python3 benchmarks/build_archive.py --shared $x/audio --out $archive --tilings ${TILINGS:-9}
case "$mode" in
  archive)
    python3 benchmarks/bench_archive.py --archive $archive --model base \
      --json-out "$out/gpu_archive.json" 2>&1 | grep -v '^INFO' | tee "$out/gpu_archive.log"
    cp "$out/gpu_archive.json" /tmp/gpu_archive.json
    ;;
  engine)  # the engine in archive mode, sequential reused from an earlier archive run (SEQUENTIAL)
    python3 benchmarks/bench_archive.py --archive $archive --model base --methods engine,engine-words \
      --sequential-from "${SEQUENTIAL:-/tmp/gpu_archive.json}" \
      --json-out "$out/gpu_archive.json" 2>&1 | grep -v '^INFO' | tee "$out/gpu_archive.log"
    cp "$out/gpu_archive.json" /tmp/gpu_archive.json
    ;;
  lone)  # each long file alone, sequential reused from the archive run
    python3 benchmarks/bench_archive.py --archive $archive --model base --methods seq,seq-words \
      --sequential-from /tmp/gpu_archive.json --lone ${LONE:-30,45,60,90} \
      --json-out "$out/gpu_lone.json" 2>&1 | grep -v '^INFO' | tee "$out/gpu_lone.log"
    ;;
  run)
    python3 benchmarks/bench_run.py --archive $archive --model base --compare "${COMPARE:-/tmp/gpu_archive.json}" \
      --json-out "$out/gpu_run.json" 2>&1 | tee "$out/gpu_run.log"
    ;;
  *) echo "usage: $0 archive|engine|lone|run" >&2; exit 2 ;;
esac
