#!/usr/bin/env bash
# MLX's CPU wheel on Linux ships a reference BLAS ~20x slower than OpenBLAS; engine/blas.py loads
# OpenBLAS when it is present. Install it if we can (root with apt-get), otherwise say how.
set -euo pipefail
for f in /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
         /usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0 \
         /usr/lib64/libopenblas.so.0 /usr/lib/libopenblas.so.0; do
  [ -e "$f" ] && exit 0
done
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null
  exit 0
fi
echo "OpenBLAS is missing: run 'sudo apt-get install libopenblas0-pthread' (or your distro's openblas)" >&2
exit 1
