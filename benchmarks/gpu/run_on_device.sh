#!/usr/bin/env bash
# Runs on the GPU machine from the repo root, after the parts of prepare.sh are in /tmp/stage/.
# usage: bash benchmarks/gpu/run_on_device.sh prepare|archive|engine|lone|run|quant|fleet
#   archive: builds the archive (3.2 h, 91 files), then bench_archive.py: sequential mlx-whisper
#            file by file vs the engine in archive mode, words off and on, and each long file alone
#   engine:  the engine's two methods only, sequential's outputs reused from an earlier archive run
#   lone:    each English long file alone (--lone lengths), the archive run's sequential outputs reused
#   run:     bench_run.py: `archive-asr run` end to end on the same archive (SQLite, embedded Valkey)
#   prepare: install and build the archive, nothing else (before modes run side by side, one per GPU)
#   quant:   bench_quant.py: base full / 8-bit / 4-bit (made here with engine.quantize) on both long files
#            and the archive, peak memory at an equal batch, large-v3-turbo shapes (random weights)
#   fleet:   fleet_drill.py on two GPUs (nvidia-h100-x2): PostgreSQL from pgserver, the embedded Valkey
#            with its password, one worker vs one per GPU, a worker SIGKILLed, the broker SIGKILLed;
#            PHASES=build,tp1,tp2 then PHASES=kill,broker in a second call if one call's 9 minutes
#            do not hold them all (state in /tmp/fleet)
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
if [ "$mode" != fleet ]; then  # the fleet drill builds its own, larger archive
  [ -f $archive/manifest.json ] || python3 benchmarks/build_archive.py --shared $x/audio --out $archive --tilings ${TILINGS:-9}
fi
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
  prepare) ;;  # install and build the archive only
  quant)  # base at full precision, 8 and 4 bits: both long files, the archive, equal-batch memory; turbo shapes
    python3 benchmarks/bench_quant.py --models base --shared $x/audio --archive $archive --fixed-batch 8 \
      --turbo-windows ${TURBO_WINDOWS:-32} --json-out "$out/gpu_quant.json" 2>&1 | grep -v '^INFO' | tee "$out/gpu_quant.log"
    ;;
  fleet)
    python3 benchmarks/fleet_drill.py --work /tmp/fleet --out "$out" --audio-root $x/audio --models-dir $x/models \
      --phases "${PHASES:-all}" --budget-s "${BUDGET_S:-520}" 2>&1 | grep -v '^INFO' | tee "$out/fleet.log"
    ;;
  *) echo "usage: $0 prepare|archive|engine|lone|run|quant|fleet" >&2; exit 2 ;;
esac
