#!/usr/bin/env bash
# One GPU session (a lent machine without network): install lark from .whl/ and moa itself (no dependencies: the
# machine has torch, triton, sympy, networkx, numpy), then run the benchmark of the speed issue and write its
# results (and the tuning records) under $OUT: the forward rows, then the decoding rows, then forward + backward,
# each under its own time limit (FWD_TIMEOUT, DECODE_TIMEOUT, BWD_TIMEOUT seconds; 0 skips a part), so that one
# device call of at most 10 minutes brings back whatever finished.   Usage: OUT=dir bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/site .
export PYTHONPATH=/tmp/site MOA_CACHE_DIR=/tmp/moa-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv
python3 -c "import torch, triton, moa; print('torch', torch.__version__, 'triton', triton.__version__, 'moa', moa.__file__)"
part() {   # part NAME SECONDS [bench.py args]: one bench.py run, its log in $OUT/NAME.log
    local name=$1 secs=$2
    shift 2
    [ "$secs" -gt 0 ] || return 0
    echo "== $name (at most $secs s)"
    timeout "$secs" python3 benchmarks/bench.py --out "$OUT" "$@" 2>&1 | tee "$OUT/$name.log"
}
part bench "${FWD_TIMEOUT:-300}"
part decode "${DECODE_TIMEOUT:-100}" --decode
part backward "${BWD_TIMEOUT:-140}" --backward
tar czf "$OUT/tune.tgz" -C /tmp/moa-cache tune 2>/dev/null || true
