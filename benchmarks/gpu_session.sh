#!/usr/bin/env bash
# Everything issue 22 measures on a GPU, in one call of under 8 minutes (run from the repository
# root on the GPU machine; writes to $OUT, 4 files; steps 1-3 take at most 450 s, step 4 runs only
# while BUDGET (450 s) is not spent):
#   session.log   everything printed (nvidia-smi, versions, test results, the tables)
#   train.json    bench_train figures of the training configurations
#   extra.json    evaluate (HRDA slide) and data-loading figures
#   variants.json end-to-end-from-PNG / channels_last / cudnn.benchmark / TF32 / compile variants
#                 (as many as the budget allows, in that order)
# Each step has its own timeout, so one hung step costs its budget, not the session; a step that
# fails leaves the others running. The project runs from src/ (no install); a missing package
# stops the session at once, naming it.
set -u -o pipefail
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
BUDGET=${BUDGET:-450}           # seconds for the whole session (the lease's call allows 600)
# Overridable for a dry run on a CPU (e.g. DEVICE=cpu SCALE=0.0625 CONFIGS=daformer_mitb0:fp32 ...)
DEVICE=${DEVICE:-cuda}
SCALE=${SCALE:-1.0}
CONFIGS=${CONFIGS:-daformer_mitb5:fp32 daformer_mitb5:bf16 daformer_r101:bf16 hrda_mitb5:bf16 hrda_mitb5:bf16:mic}
VARIANTS=${VARIANTS:-hrda_mitb5:bf16:mic:png daformer_r101:bf16:cl daformer_r101:bf16:cudnn daformer_mitb5:fp32:tf32 daformer_mitb5:bf16:compile}
COMMON="--device $DEVICE --crop-scale $SCALE"
START=$(date +%s)
LOG="$OUT/session.log"
elapsed() { echo $(( $(date +%s) - START )); }
step() { echo; echo "=== [$(elapsed) s] $*"; }
left() { echo $(( BUDGET - $(elapsed) )); }

{
step "machine"
nvidia-smi || echo "nvidia-smi failed"
nproc
DEVICE=$DEVICE $PY - <<'EOF' || { echo "FATAL: an import or the GPU is missing (see above); carry the package as a wheel"; exit 3; }
import importlib, os, torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
if os.environ["DEVICE"].startswith("cuda"):
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for name in ("domainmerge", "numpy", "scipy", "PIL", "yaml", "tqdm", "safetensors", "matplotlib", "pytest"):
    m = importlib.import_module(name)
    print(name, getattr(m, "__version__", ""), m.__file__)
EOF
} 2>&1 | tee "$LOG"
[ "${PIPESTATUS[0]}" = 3 ] && exit 3

{
step "1. CUDA against CPU, and a CUDA iteration without host syncs (tests/test_hot_path.py -k cuda)"
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_hot_path.py -k cuda -rs --tb=short \
    || echo "STEP 1 FAILED (rc $?)"

step "2. training configurations (bench_train: 2 warm-ups, 6 timed, 1 profiled, 1 FLOP-counted)"
# shellcheck disable=SC2086
timeout 220 $PY benchmarks/bench_train.py $COMMON --warmup 2 --iters 6 --profile-iters 1 --timeout 75 \
    --configs $CONFIGS --json "$OUT/train.json" || echo "STEP 2 FAILED (rc $?)"

step "3. evaluate (HRDA MiT-B5 slide at 2048x1024, bf16) and data loading (Cityscapes-sized PNGs)"
# shellcheck disable=SC2086
timeout 110 $PY benchmarks/bench_train.py $COMMON --skip-train --evaluate --eval-images 6 \
    --data --images 12 --workers 0 1 4 8 --pin --json "$OUT/extra.json" || echo "STEP 3 FAILED (rc $?)"

step "4. variants while time is left: end to end from PNGs with 8 workers, channels_last, cudnn.benchmark, TF32, compile"
for spec in $VARIANTS; do
    budget=$(left)
    if [ "$budget" -lt 60 ]; then echo "skipped $spec: ${budget} s left"; continue; fi
    t=$(( budget < 200 ? budget - 10 : 190 ))
    # shellcheck disable=SC2086
    timeout "$t" $PY benchmarks/bench_train.py $COMMON --warmup 2 --iters 6 --profile-iters 1 \
        --timeout $(( t - 5 )) --configs "$spec" --json "$OUT/variant_${spec//:/_}.json" || echo "$spec FAILED (rc $?)"
done
$PY - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
parts = sorted(out.glob("variant_*.json"))
json.dump([r for p in parts for r in json.loads(p.read_text())], open(out / "variants.json", "w"), indent=1)
for p in parts:
    p.unlink()
EOF

step "done"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,temperature.gpu --format=csv || true
} 2>&1 | tee -a "$LOG"
