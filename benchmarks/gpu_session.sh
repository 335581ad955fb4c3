#!/usr/bin/env bash
# One GPU session (a lent machine without network): install lark from .whl/ and moa itself (no dependencies: the
# machine has torch, triton, sympy, networkx, numpy), then run the benchmark of the speed issue and write its
# results (and the tuning records) under $OUT.   Usage: OUT=dir bash benchmarks/gpu_session.sh [bench.py args]
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/site .
export PYTHONPATH=/tmp/site MOA_CACHE_DIR=/tmp/moa-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv
python3 -c "import torch, triton, moa; print('torch', torch.__version__, 'triton', triton.__version__, 'moa', moa.__file__)"
timeout "${BENCH_TIMEOUT:-480}" python3 benchmarks/bench.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
tar czf "$OUT/tune.tgz" -C /tmp/moa-cache tune 2>/dev/null || true
