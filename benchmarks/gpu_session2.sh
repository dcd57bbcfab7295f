#!/usr/bin/env bash
# Issue 22, second GPU session: checks the host-sync fixes and measures the iteration with and
# without torch.compile, in at most BUDGET (480) seconds of wall time (run from the repository
# root on the GPU machine, PYTHONPATH=src, kornia installed beforehand; nothing is installed here).
# Steps, in order of value (each under its own timeout, cut to the time left; a step that would
# get under 25 s is skipped and says so):
#   1. tests/test_hot_path.py tests/test_compile.py -k cuda: no host sync inside an iteration, CUDA equals CPU, compiled equals eager  (<= 120 s)
#   1b. bench_grad_shadow: host time of the weight casts, cached against GradShadow (<= 30 s)
#   2. bench_train daformer_mitb5:bf16 and hrda_mitb5:bf16:mic, each also with :onepass (the
#      student's views in one forward and backward)                                     (<= 50, 70 s each)
#   3. bench_train daformer_mitb5:bf16:onepass:blocks (compiled block by block: the shorter
#      compile), then with :cg (reduce-overhead: CUDA graphs per block), the same for
#      hrda_mitb5:bf16:mic, and daformer_mitb5:bf16:compile (whole backbone)            (time left)
#   4. bench_train --evaluate: HRDA slide inference, same batches in every pass          (<= 60 s)
# bench_train: 2 warm-ups (the compile happens in the first: its time is the 'first iteration'
# column), 4 timed, 1 profiled, no FLOP-counted iteration (FLOPs are known from session 1).
# Output (copied into $OUT at the end, also when a timeout ends the script): session2.log (all
# printed), train2.json (every configuration's figures, including the top operators per iteration).
# EAGER="" or COMPILED="" (set but empty) skips a group; e.g. COMPILED=hrda_mitb5:bf16:mic:compile EAGER=""
# gives the HRDA compile the whole budget.
set -u -o pipefail
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
OUT=${OUT:-/tmp/gpu_session2}
BUDGET=${BUDGET:-480}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}          # DEVICE=cpu SCALE=0.0625 ... for a dry run on a CPU
SCALE=${SCALE:-1.0}
EAGER=${EAGER-daformer_mitb5:bf16 daformer_mitb5:bf16:onepass hrda_mitb5:bf16:mic:onepass hrda_mitb5:bf16:mic}
COMPILED=${COMPILED-daformer_mitb5:bf16:onepass:blocks daformer_mitb5:bf16:onepass:blocks:cg hrda_mitb5:bf16:mic:onepass:blocks:cg daformer_mitb5:bf16:compile}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d)
LOG="$WORK/session2.log"
START=$(date +%s)
mkdir -p "$OUT"
finish() {   # merge the per-configuration JSON files and copy the results into $OUT
    $PY - "$WORK" <<'EOF' || true
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
parts = sorted(work.glob("part_*.json"))
rows = [r for p in parts for r in json.loads(p.read_text() or "[]")]
(work / "train2.json").write_text(json.dumps(rows, indent=1))
EOF
    cp "$LOG" "$WORK/train2.json" "$OUT"/ 2>/dev/null || true
}
trap finish EXIT
trap "exit 143" TERM INT
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
step() { echo; echo "=== [$(elapsed) s] $*"; }
# seconds for a step: its cap, cut to the time left (less 5 s for the copy); 0: skip
allow() { local l; l=$(( $(left) - 5 )); [ "$l" -lt 25 ] && { echo 0; return; }; echo $(( l < $1 ? l : $1 )); }

bench() {   # bench() CAP CONFIG
    local t n
    t=$(allow "$1")
    if [ "$t" = 0 ]; then echo "skipped $2: $(left) s left"; return; fi
    n=$(( $(ls "$WORK"/part_*.json 2>/dev/null | wc -l) + 1 ))
    # shellcheck disable=SC2086
    timeout "$t" $PY benchmarks/bench_train.py --device "$DEVICE" --crop-scale "$SCALE" --warmup 2 --iters 4 \
        --profile-iters 1 --skip-flops --timeout $(( t - 3 )) --configs "$2" --json "$WORK/part_$n.json" \
        || echo "$2 FAILED (rc $?)"
}

{
step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "nvidia-smi failed"
$PY -c "import torch, kornia; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'kornia', kornia.__version__)" \
    || { echo "FATAL: torch or kornia missing"; exit 3; }

step "1. CUDA iteration without host syncs, CUDA against CPU (tests/test_hot_path.py tests/test_compile.py -k cuda)"
t=$(allow 120)
timeout "$t" $PY -m pytest -q -p no:cacheprovider tests/test_hot_path.py tests/test_compile.py -k cuda -rs --tb=short \
    || echo "STEP 1 FAILED (rc $?)"

step "1b. the student's weight casts: cached casts against GradShadow (bench_grad_shadow.py)"
t=$(allow 30)
[ "$t" != 0 ] && { timeout "$t" $PY benchmarks/bench_grad_shadow.py --device "$DEVICE" --iters 20 \
    || echo "STEP 1b FAILED (rc $?)"; }

step "2. eager bf16 (host syncs and kernels per iteration after the fixes)"
for spec in $EAGER; do
    case $spec in hrda*) bench 70 "$spec" ;; *) bench 50 "$spec" ;; esac
done

step "3. torch.compile (first iteration = compile time)"
for spec in $COMPILED; do
    bench 150 "$spec"
done

step "4. evaluate, HRDA MiT-B5 slide at 2048x1024 bf16: warm-up, timed and profiled passes over the same 4 images"
t=$(allow 60)
if [ "$t" = 0 ]; then echo "skipped evaluate: $(left) s left"; else
    n=$(( $(ls "$WORK"/part_*.json 2>/dev/null | wc -l) + 1 ))
    timeout "$t" $PY benchmarks/bench_train.py --device "$DEVICE" --crop-scale "$SCALE" --skip-train --evaluate \
        --eval-images 4 --timeout $(( t - 3 )) --json "$WORK/part_$n.json" || echo "evaluate FAILED (rc $?)"
fi
step "done ($(left) s of the budget left)"
} 2>&1 | tee "$LOG"
