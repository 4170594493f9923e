#!/usr/bin/env bash
# Runs on the GPU machine from the repo root, after the parts of prepare.sh are in /tmp/stage/.
# usage: bash benchmarks/gpu/run_on_device.sh prepare|archive|engine|lone|late|run|e2e|plan|hostshare|hostcpu|hostmem|fleetspy|quant|fleet|twogpu|batches|fleetrun|d1|d2|d3
#   archive: builds the archive (3.2 h, 91 files), then bench_archive.py: sequential mlx-whisper
#            file by file vs the engine in archive mode, words off and on, and each long file alone
#   engine:  the engine's two methods only, sequential's outputs reused from an earlier archive run
#   lone:    each English long file alone and each piece of LONE_TILINGS (default 3) tilings alone, cut at
#            the LONE lengths (default 12,15,18,20,22; LONE_WORDS off,on), against sequential mlx-whisper
#            on the same files (SEQUENTIAL: an earlier gpu_lone.json's, not run again)
#   late:    late_start.py: sequential mlx-whisper on each English long file whole and from OFFSETS on (SPAN s),
#            how many words differ as it goes on, and what one moved start does to WER
#   run:     bench_run.py: `archive-asr run` end to end on the same archive (SQLite, embedded Valkey)
#   prepare: install and build the archive, nothing else (before modes run side by side, one per GPU)
#   e2e:     on the fleet's archive (built by `fleet`, state in /tmp/fleet), GPU 0 only: the engine alone
#            (REPEAT runs, the fastest reported), then `archive-asr run` end to end, then where its start goes
#   plan:    on the fleet's archive, GPU 0 only: the engine alone, rows planned, REPEAT sessions in one
#            process, with the memory the plan sees before each
#   hostshare: the engine alone on half of the fleet's archive, GPU 0 alone, both GPUs at once, GPU 0
#            alone again: what sharing one host costs each engine, without the database or the broker
#   hostcpu: is it the host's CPUs? benchmarks/host_cpu_probe.py (one thread's speed as others spin,
#            and which CPU slows CPU 0 most), then the engine on a third of the fleet's archive (TILINGS,
#            default 80): arrays and paths alone, arrays beside 14 spinning processes (unpinned, then
#            the engine on CPUs 0-7 and the spinners on 8-31), both GPUs at once from paths (unpinned,
#            then split 0-15 / 16-31, then even / odd CPUs)
#   fleetspy: the fleet drill (PHASES, default build,warmup,tp1,tp2; TILINGS, default 80: 24.6 h) with
#            every engine worker sampled by py-spy for 10 s once it has run 15 s (--gil: which thread holds
#            the GIL; benchmarks/gil_holders.py sums them); carry .gpu/py_spy-*.whl (prepare.sh fetches it)
#   hostmem: the engine alone (arrays) on a third of the fleet's archive (TILINGS, default 80), GPU 0:
#            alone, beside 14 processes streaming memory (host_cpu_probe.py --burn 14 --memory), beside
#            14 spinning in cache, alone again: which kind of load on the host's other CPUs slows it
#   quant:   bench_quant.py: MODELS (default base) full / 8-bit / 4-bit (VARIANTS; LONG_FILES='' skips them) (made here with engine.quantize) on both long files
#            and the archive, peak memory at an equal batch, large-v3-turbo shapes (random weights)
#   fleet:   fleet_drill.py on two GPUs (nvidia-h100-x2): PostgreSQL from pgserver, the embedded Valkey
#            with its password, one worker vs one per GPU, a worker SIGKILLed, the broker SIGKILLed;
#            PHASES=build,tp1,tp2 then PHASES=kill,broker in a second call if one call's 9 minutes
#            do not hold them all (state in /tmp/fleet); TILINGS sets the archive's size (96: ~30 h);
#            REPEAT=N runs tp1 and tp2 alternately N times; FLEET_WORK: another state folder (another archive)
#   batches: GPU 0: bench_batch.py (encode and decoding steps per batch size), then the engine alone
#            on the fleet's larger archive (built here, FLEET_TILINGS) for each of VARIANTS
#            (bench_archive's engine-words:bN); GPU 1 meanwhile: sequential
#            mlx-whisper with words on /tmp/archive (the x sequential figure of the same call)
#   fleetrun: the fleet drill's warmup,tp1,tp2 (ROWS rows a worker, if set), then `archive-asr run`
#            (bench_run.py) on the same larger archive, compared with COMPARE_METHOD of `batches`
#            (default engine-words:bROWS, ROWS 128 by default here)
#   twogpu:  one call, both cards: GPU 0 runs the engine alone and `archive-asr run` (bench_run.py) on
#            /tmp/archive, then on the fleet's larger archive (BIG, if built), and the engine with its
#            tail cut (CUTS, e.g. 90,150); GPU 1 meanwhile runs base full / 8 / 4-bit on /tmp/archive
#            and sequential mlx-whisper with words (the x sequential figure of the same call)
#   d1, d2, d3: one call each on two cards (see their comments below; REPEAT, default 2: runs of each
#            engine method, the fastest reported, as a fresh machine's first compiles kernels): sequential Whisper on a ~9 h
#            archive in two shards beside the engine and `archive-asr run`, with where a worker's start
#            goes; the engine at 64 and 128 rows and `run` on ~31 h; the fleet's warmup, tp1, tp2 and
#            then the engine and `run` on ~24 h
# Results: printed, and JSON under $OUT (the device tool brings $OUT back).
set -euo pipefail
mode=${1:-archive}
if [ ! -d /tmp/site/mlx ]; then
  (cd /tmp/stage && mkdir -p x && cat part* | tar xf - -C x && bash x/install-on-device.sh)
  # the bundle installs with --no-compile; pip compiles bytecode by default, so a user's first run
  # does not compile celery, sqlalchemy & co. on import, and neither should the benchmarks' first
  python3 -m compileall -q -j 0 /tmp/site . > /dev/null 2>&1 || true
fi
# MLX's CUDA kernels as PTX, cached on disk by MLX 0.32.4 after it compiles them (fetched from an
# H200 run, 2026-11-28: tar czf $OUT/ptx.tgz -C /tmp mlx). A fresh machine compiles them on first
# use: the first worker's decoding kernels took 92-102 s there; with this cache unpacked, 2.9-3.6 s
# (a fresh H200 pair, 2026-11-28, the fleet drill's warm-up).
[ -d /tmp/mlx ] || tar xzf benchmarks/gpu/mlx-ptx-cache.tgz -C /tmp 2>/dev/null || true
export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
x=/tmp/stage/x/extra
export ARCHIVE_ASR_DATA_DIR=/tmp/archive-asr-data ARCHIVE_ASR_MODELS_DIR=$x/models
out=${OUT:-/tmp/bench-out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
archive=/tmp/archive
drill() {  # fleet_drill.py on /tmp/fleet (state kept between calls): $1 phases, $2 out folder, $3 tilings, then extra options
  python3 benchmarks/fleet_drill.py --work "${FLEET_WORK:-/tmp/fleet}" --out "$2" --audio-root $x/audio --models-dir $x/models \
    --phases "$1" --tilings "$3" "${@:4}" 2>&1 | grep --line-buffered -v '^INFO'
}
big_engine_and_run() {  # on GPU 0, the fleet's archive: the engine alone ($1: methods), then `archive-asr run` compared with $2
  cp /tmp/fleet/archive/manifest.json /tmp/fleet/archive/files/manifest.json
  CUDA_VISIBLE_DEVICES=0 python3 benchmarks/bench_archive.py --archive /tmp/fleet/archive/files --model base \
    --methods "$1" --repeat "${REPEAT:-2}" --json-out /tmp/gpu0_engine_big.json 2>&1 \
    | grep --line-buffered -v '^INFO' | tee "$out/gpu0_engine_big.log" | cut -c1-700
  CUDA_VISIBLE_DEVICES=0 python3 benchmarks/bench_run.py --archive /tmp/fleet/archive/files --model base \
    --compare /tmp/gpu0_engine_big.json --compare-method "$2" --json-out "$out/gpu0_run_big.json" 2>&1 \
    | tee "$out/gpu0_run_big.log" | tail -48
}
fleet_archive() {  # the fleet's archive (built here if missing: TILINGS, default 80), its manifest where bench_archive reads it
  [ -f /tmp/fleet/archive/manifest.json ] || drill build "$out/build" "${TILINGS:-80}" | tail -2
  cp /tmp/fleet/archive/manifest.json /tmp/fleet/archive/files/manifest.json
}
engine_shard() {  # the engine alone on a shard of the fleet's archive: $1 GPU, $2 shard (I/N), $3 name, $4 methods, $5 CPUs (taskset) or ""
  ${5:+taskset -c $5} env CUDA_VISIBLE_DEVICES=$1 python3 benchmarks/bench_archive.py --archive /tmp/fleet/archive/files \
    --model base --methods "$4" --batch-size 64 --shard "$2" --json-out "$out/$3.json" 2>&1 | grep -v '^INFO' > "$out/$3.log"
}
burn() { ${2:+taskset -c $2} python3 benchmarks/host_cpu_probe.py --burn "$1" ${3:-} --seconds 600 & burner=$!; }  # $1 processes, $2 CPUs or "", $3 --memory
unburn() { kill $burner; wait $burner 2>/dev/null || true; }
case "$mode" in  # these build their own archives (the fleet drill's, larger; lone's); the others share /tmp/archive
  fleet|lone|late|hostshare|e2e|plan|fleetrun|d1|d2|d3) ;;
  *) [ -f $archive/manifest.json ] || python3 benchmarks/build_archive.py --shared $x/audio --out $archive --tilings ${TILINGS:-9} ;;
esac
case "$mode" in
  archive)
    python3 benchmarks/bench_archive.py --archive $archive --model base \
      --json-out "$out/gpu_archive.json" 2>&1 | grep --line-buffered -v '^INFO' | tee "$out/gpu_archive.log"
    cp "$out/gpu_archive.json" /tmp/gpu_archive.json
    ;;
  engine)  # the engine in archive mode, sequential reused from an earlier archive run (SEQUENTIAL)
    python3 benchmarks/bench_archive.py --archive $archive --model base --methods engine,engine-words \
      --sequential-from "${SEQUENTIAL:-/tmp/gpu_archive.json}" \
      --json-out "$out/gpu_archive.json" 2>&1 | grep --line-buffered -v '^INFO' | tee "$out/gpu_archive.log"
    cp "$out/gpu_archive.json" /tmp/gpu_archive.json
    ;;
  lone)  # each long file alone, and each piece of LONE_TILINGS tilings alone: sequential on them, then the cut lengths LONE
    [ -f /tmp/lonearch/manifest.json ] || python3 benchmarks/build_archive.py --shared $x/audio --out /tmp/lonearch \
      --tilings ${LONE_TILINGS:-3} --english-only > /dev/null
    sets=mix-whole,read2-whole,lj-whole$(for k in $(seq 0 $((${LONE_TILINGS:-3} - 1))); do printf ,mix-pieces-$k,read2-pieces-$k; done)
    python3 benchmarks/bench_archive.py --archive /tmp/lonearch --model base --methods seq,seq-words --sets $sets \
      ${SEQUENTIAL:+--sequential-from $SEQUENTIAL} \
      --lone ${LONE:-12,15,18,20,22} --lone-words ${LONE_WORDS:-off,on} --lone-sets $sets --json-out "$out/gpu_lone.json" 2>&1 \
      | grep --line-buffered -v '^INFO\|^memory' | tee "$out/gpu_lone.log" | cut -c1-600
    ;;
  late)  # sequential Whisper started late (OFFSETS, SPAN) against the whole file: the noise floor of a cut
    python3 benchmarks/late_start.py --model base --shared $x/audio --offsets "${OFFSETS:-40,100,150,200,260}" \
      --span "${SPAN:-200}" --json-out "$out/gpu_late.json" 2>&1 | grep --line-buffered -v '^INFO' | tee "$out/gpu_late.log"
    ;;
  run)
    python3 benchmarks/bench_run.py --archive $archive --model base --compare "${COMPARE:-/tmp/gpu_archive.json}" \
      --json-out "$out/gpu_run.json" 2>&1 | tee "$out/gpu_run.log"
    ;;
  prepare) ;;  # install and build the archive only
  quant)  # base at full precision, 8 and 4 bits: both long files, the archive, equal-batch memory; turbo shapes
    python3 benchmarks/bench_quant.py --models "${MODELS:-base}" --shared $x/audio --archive $archive --fixed-batch ${FIXED_BATCH:-8} \
      --variants "${VARIANTS:-full,8,4}" --long-files "${LONG_FILES-longform/english_read_mix_concat.flac,longform/english_read2_concat.flac}" \
      --turbo-windows ${TURBO_WINDOWS:-32} --json-out "$out/gpu_quant.json" 2>&1 | grep --line-buffered -v '^INFO' | tee "$out/gpu_quant.log"
    ;;
  e2e)
    big_engine_and_run "${VARIANTS:-engine-words}" "${COMPARE_METHOD:-engine-words}"
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/run_timeline.py tests/data/samples --model base 2>&1 | tee "$out/run_timeline.log"
    ;;
  fleet)
    drill "${PHASES:-all}" "$out" "${TILINGS:-13}" --budget-s "${BUDGET_S:-520}" --repeat "${REPEAT:-1}" | tee "$out/fleet.log"
    ;;
  fleetspy)
    python3 -m pip install -q --no-index --target /tmp/spy .gpu/py_spy-*.whl
    spy_workers() {  # in the background: py-spy on each engine worker process once it is 15 s old
      while true; do
        for pid in $(pgrep -f "cli worker.*--device" || true); do
          [ -e "$out/spy/$pid.txt" ] || [ "$(ps -o etimes= -p "$pid" 2>/dev/null || echo 0)" -lt 15 ] && continue
          mkdir -p "$out/spy"; : > "$out/spy/$pid.txt"
          (timeout 20 /tmp/spy/bin/py-spy record --gil --threads --nonblocking -r 200 -d 10 -f raw \
             -o "$out/spy/$pid.txt" -p "$pid" > "$out/spy/$pid.log" 2>&1 || true) &
        done
        sleep 1
      done
    }
    spy_workers & spy=$!
    drill "${PHASES:-build,warmup,tp1,tp2}" "$out" "${TILINGS:-80}" --budget-s "${BUDGET_S:-520}" | tee "$out/fleet.log" \
      | grep "pair\|tp[12]" || true
    kill $spy 2>/dev/null || true; sleep 1
    python3 benchmarks/gil_holders.py "$out/spy" || true
    ;;
  hostshare)  # is one host a shared resource? The engine alone (no database, no broker) on half of the
              # fleet's archive (built here: TILINGS, default 80): GPU 0 alone, then GPU 0 and GPU 1 at once
              # (each its half), then GPU 0 alone again; compare each run's time per window
    fleet_archive
    engine_shard 0 0/2 alone1 engine-words
    engine_shard 0 0/2 pair_gpu0 engine-words & engine_shard 1 1/2 pair_gpu1 engine-words & wait
    engine_shard 0 0/2 alone2 engine-words
    grep -h "engine-words {" "$out"/*.log | cut -c1-300
    ;;
  hostmem)
    fleet_archive
    engine_shard 0 0/3 alone1 engine-words
    burn 14 "" --memory; engine_shard 0 0/3 memory14 engine-words; unburn
    burn 14 ""; engine_shard 0 0/3 spin14 engine-words; unburn
    engine_shard 0 0/3 alone2 engine-words
    grep -H "^engine-words" "$out"/*.log | sed "s|$out/||" | cut -c1-160
    ;;
  hostcpu)
    lscpu | grep -E "Model name|^CPU\(s\)|Thread|Core|Socket|NUMA|MHz" || true
    python3 benchmarks/host_cpu_probe.py --json-out "$out/probe.json"
    fleet_archive
    engine_shard 0 0/3 alone engine-words,engine-words:paths
    burn 14 ""; engine_shard 0 0/3 burn14 engine-words; unburn
    burn 14 8-31; engine_shard 0 0/3 burn14_pinned engine-words 0-7; unburn
    engine_shard 0 0/3 pair_gpu0 engine-words:paths & engine_shard 1 1/3 pair_gpu1 engine-words:paths & wait
    engine_shard 0 0/3 split_gpu0 engine-words:paths 0-15 & engine_shard 1 1/3 split_gpu1 engine-words:paths 16-31 & wait
    engine_shard 0 0/3 evenodd_gpu0 engine-words:paths 0-30:2 & engine_shard 1 1/3 evenodd_gpu1 engine-words:paths 1-31:2 & wait
    grep -H "^engine-words" "$out"/*.log | sed "s|$out/||" | cut -c1-230
    ;;
  plan)  # GPU 0: the engine alone on the fleet's archive, rows planned, REPEAT sessions in one process,
         # with what the plan sees before each (a second session once planned 18 rows: README "Batch size")
    cp /tmp/fleet/archive/manifest.json /tmp/fleet/archive/files/manifest.json
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/bench_archive.py --archive /tmp/fleet/archive/files --model base \
      --methods engine-words --repeat "${REPEAT:-2}" --json-out "$out/gpu0_plan.json" 2>&1 \
      | grep --line-buffered -v '^INFO' | tee "$out/gpu0_plan.log" | cut -c1-900
    ;;
  batches)
    ( export CUDA_VISIBLE_DEVICES=1
      python3 benchmarks/bench_archive.py --archive $archive --model base --methods seq-words \
        --json-out "$out/gpu1_seq_words.json" > "$out/gpu1_seq.log" 2>&1 ) &
    gpu1=$!
    export CUDA_VISIBLE_DEVICES=0
    /usr/bin/time -f "counting GPUs (python -m engine.device): %e s" python3 -m engine.device
    python3 benchmarks/bench_batch.py --model base --batches ${BATCHES:-32,64,128,192,256} \
      --audio $x/audio/longform/english_read_mix_concat.flac --json-out "$out/gpu0_batch.json" 2>&1 | grep --line-buffered -v '^INFO' | tee "$out/gpu0_batch.log"
    drill build /tmp/fleet-out "${FLEET_TILINGS:-80}" | tail -3
    cp /tmp/fleet/archive/manifest.json /tmp/fleet/archive/files/manifest.json
    python3 benchmarks/bench_archive.py --archive /tmp/fleet/archive/files --model base \
      --methods "${VARIANTS:-engine-words:b64,engine-words:b128}" \
      --json-out "$out/gpu0_engine_big.json" 2>&1 | grep --line-buffered -v '^INFO' | tee "$out/gpu0_engine_big.log" | tail -30
    cp "$out/gpu0_engine_big.json" /tmp/gpu0_engine_big.json || true
    wait $gpu1 || echo "GPU 1's run failed: see $out/gpu1_seq.log"
    grep -v '^INFO' "$out/gpu1_seq.log" | tail -5
    ;;
  fleetrun)
    rows=()
    [ -n "${ROWS:-}" ] && rows=(--batch-size "$ROWS")
    drill "${PHASES:-warmup,tp1,tp2}" "$out" "${FLEET_TILINGS:-80}" --budget-s "${BUDGET_S:-330}" "${rows[@]}" \
      | tee "$out/fleet.log"
    export CUDA_VISIBLE_DEVICES=0
    if [ ! -f /tmp/gpu0_engine_big.json ]; then  # the engine alone on the same archive, for the ratio
      cp /tmp/fleet/archive/manifest.json /tmp/fleet/archive/files/manifest.json
      python3 benchmarks/bench_archive.py --archive /tmp/fleet/archive/files --model base \
        --methods "engine-words:b${ROWS:-128}" --json-out /tmp/gpu0_engine_big.json 2>&1 \
        | grep --line-buffered -v '^INFO' | tee "$out/gpu0_engine_big.log" | cut -c1-600
    fi
    python3 benchmarks/bench_run.py --archive /tmp/fleet/archive/files --model base "${rows[@]}" \
      --compare /tmp/gpu0_engine_big.json --compare-method "${COMPARE_METHOD:-engine-words:b${ROWS:-128}}" \
      --json-out "$out/gpu0_run_big.json" 2>&1 | tee "$out/gpu0_run_big.log" | tail -45
    ;;
  d1)  # both cards, one call: where a worker's start goes (startup_probe.py, kernel cache cold then
       # warm), then a ~9 h archive (MID_TILINGS, default 28) that sequential Whisper can cover within
       # the call: it runs on half the files on GPU 1 while GPU 0 runs the engine (128 and 64 rows)
       # and `archive-asr run`, then on the other half on GPU 0; the shards are merged at the end
    export CUDA_VISIBLE_DEVICES=0
    for cache in cold warm; do
      MLX_PTX_CACHE_DIR=/tmp/ptx-probe python3 benchmarks/startup_probe.py --model base --device gpu:0 \
        --audio $x/audio/en/jfk.flac --json-out "$out/probe_$cache.json" 2>&1 | grep --line-buffered -v '^INFO' | tail -16
    done
    mid=/tmp/mid
    [ -f $mid/manifest.json ] || python3 benchmarks/build_archive.py --shared $x/audio --out $mid --tilings ${MID_TILINGS:-28} --jobs "$(nproc)"
    ( export CUDA_VISIBLE_DEVICES=1
      python3 benchmarks/bench_archive.py --archive $mid --model base --methods seq-words --shard 0/2 \
        --json-out /tmp/mid_seq0.json > "$out/gpu1_seq0.log" 2>&1 ) &
    gpu1=$!
    python3 benchmarks/bench_archive.py --archive $mid --model base --methods engine-words:b64,engine-words:b128 \
      --repeat "${REPEAT:-2}" --json-out /tmp/mid_engine.json 2>&1 | grep --line-buffered -v '^INFO' | tee "$out/gpu0_engine_mid.log" | cut -c1-400
    python3 benchmarks/bench_run.py --archive $mid --model base --compare /tmp/mid_engine.json \
      --compare-method engine-words:b128 --json-out "$out/gpu0_run_mid.json" 2>&1 | tee "$out/gpu0_run_mid.log" | tail -50
    python3 benchmarks/bench_archive.py --archive $mid --model base --methods seq-words --shard 1/2 \
      --json-out /tmp/mid_seq1.json 2>&1 | grep --line-buffered -v '^INFO' | tail -3
    wait $gpu1 || echo "GPU 1's run failed: see $out/gpu1_seq0.log"
    tail -3 "$out/gpu1_seq0.log"
    python3 benchmarks/bench_archive.py --archive $mid --model base --reuse /tmp/mid_seq0.json,/tmp/mid_seq1.json,/tmp/mid_engine.json \
      --methods seq-words,engine-words:b128,engine-words:b64 --json-out /tmp/mid_all.json 2>&1 | grep -v '^INFO' | cut -c1-600
    gzip -c /tmp/mid_all.json > "$out/mid_all.json.gz"
    ;;
  d2)  # both cards, one call, on the fleet's larger archive (FLEET_TILINGS, default 100: ~31 h): GPU 0
       # runs the engine alone at 64 and 128 rows, then `archive-asr run` end to end (compared with
       # COMPARE_METHOD, default engine-words:b64); then the fleet drill's warmup, tp1 and tp2
    drill build /tmp/fleet-out "${FLEET_TILINGS:-100}" | tail -3
    big_engine_and_run "${VARIANTS:-engine-words:b64,engine-words:b128}" "${COMPARE_METHOD:-engine-words:b64}"
    drill warmup,tp1,tp2 "$out" "${FLEET_TILINGS:-100}" --budget-s "${BUDGET_S:-300}" | tee "$out/fleet.log"
    ;;
  d3)  # both cards, one call, on the fleet's archive (FLEET_TILINGS, default 80: ~24 h): the fleet
       # drill's warmup (MLX compiles its kernels there on a fresh machine), tp1 and tp2; then on
       # GPU 0 the engine alone and `archive-asr run`, both at the default rows, warm
    drill build /tmp/fleet-out "${FLEET_TILINGS:-80}" | tail -3
    drill warmup,tp1,tp2 "$out" "${FLEET_TILINGS:-80}" --budget-s "${BUDGET_S:-260}" | tee "$out/fleet.log"
    big_engine_and_run "${VARIANTS:-engine-words}" "${COMPARE_METHOD:-engine-words}"
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/run_timeline.py tests/data/samples --model base 2>&1 | tee "$out/run_timeline.log"
    ;;
  twogpu)
    (  # GPU 1: quantised variants on the archive, then sequential with words
      export CUDA_VISIBLE_DEVICES=1
      python3 benchmarks/bench_quant.py --models base --variants full,8,4 --shared $x/audio --long-files '' \
        --archive $archive --fixed-batch 0 --json-out "$out/gpu1_quant_archive.json" > "$out/gpu1_quant.log" 2>&1
      python3 benchmarks/bench_archive.py --archive $archive --model base --methods seq-words \
        --json-out "$out/gpu1_seq_words.json" > "$out/gpu1_seq.log" 2>&1
    ) &
    gpu1=$!
    export CUDA_VISIBLE_DEVICES=0
    e2e() {  # $1: archive folder (with manifest.json), $2: name
      python3 benchmarks/bench_archive.py --archive "$1" --model base --methods engine-words \
        --json-out "$out/gpu0_engine_$2.json" 2>&1 | grep --line-buffered -v '^INFO' | tee "$out/gpu0_engine_$2.log" | tail -30
      python3 benchmarks/bench_run.py --archive "$1" --model base --compare "$out/gpu0_engine_$2.json" \
        --json-out "$out/gpu0_run_$2.json" 2>&1 | tee "$out/gpu0_run_$2.log" | tail -60
    }
    e2e $archive small
    for cut in ${CUTS//,/ }; do
      python3 benchmarks/bench_archive.py --archive $archive --model base --methods engine-words --min-region-s "$cut" \
        --json-out "$out/gpu0_engine_cut$cut.json" 2>&1 | grep --line-buffered -v '^INFO' | tee "$out/gpu0_engine_cut$cut.log" | tail -20
    done
    if [ -n "${BIG:-}" ] && [ -d /tmp/fleet/archive/files ]; then
      cp /tmp/fleet/archive/manifest.json /tmp/fleet/archive/files/manifest.json
      e2e /tmp/fleet/archive/files big
    fi
    wait $gpu1 || echo "GPU 1's runs failed: see $out/gpu1_*.log"
    ;;
  *) echo "usage: $0 prepare|archive|engine|lone|run|e2e|plan|quant|fleet|twogpu|batches|fleetrun|d1|d2|d3" >&2; exit 2 ;;
esac
