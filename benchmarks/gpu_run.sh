#!/usr/bin/env bash
# One call on a GPU machine (no network), in the order of issue 18: environment report, build, CUDA tests, the
# headline (both designs against plain eager and torch.compile, then their DRAM bytes under ncu when installed),
# the vocabulary sweep, GAE, the linear path, the update step at GPT-J-6B's shape, the rest of the grid, report.
#
#   bash benchmarks/gpu_run.sh OUT_DIR
#
# Writes into OUT_DIR (flat, at most 5 files, as the device tool copies back): run.log (everything),
# <GPU name>.jsonl (the benchmark records), summary.md and <GPU name>.md (tables; plots are drawn later,
# where the records are committed). Each stage has its own time limit and the whole run stays inside
# APA_GPU_BUDGET_S (default 530 s) so that it ends inside a 9-minute call; a stage that fails or runs out
# of time is logged and the next one runs. Every record is written as soon as it is measured, so a cut-short
# run still leaves its most important figures.
#
# Environment: APA_BENCH_COMMIT (the commit hash to stamp on the records; the device copy has no .git),
# PYTHON (default python3), APA_GPU_BUDGET_S, APA_BENCH_GRID (default: full on a GPU).
set -u -o pipefail

OUT_DIR=${1:?usage: bash benchmarks/gpu_run.sh OUT_DIR}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/run.log"
PY=${PYTHON:-python3}
BUDGET_S=${APA_GPU_BUDGET_S:-530}
START_S=$SECONDS

# Kernels must compile for the GPU: the unit tests' conftest only sets the interpreter when this is unset.
export TRITON_INTERPRET=0 TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export APA_BENCH_RESULTS_DIR="$OUT_DIR"
# Build only for this GPU (Hopper) with more parallel nvcc jobs than the cautious default.
export APA_FAST_CUDA_ARCHS=${APA_FAST_CUDA_ARCHS:-9.0} MAX_JOBS=${MAX_JOBS:-8}

remaining_s() { echo $((BUDGET_S - (SECONDS - START_S))); }

# stage NAME LIMIT_S COMMAND...: run with a time limit (SIGINT first, so pytest ends cleanly), log everything.
stage() {
    local name=$1 limit=$2
    shift 2
    local left
    left=$(remaining_s)
    ((limit > left)) && limit=$left
    if ((limit < 5)); then
        echo "=== $name: skipped, the time budget is spent" | tee -a "$LOG"
        return 0
    fi
    echo "=== $name (limit ${limit}s, t=$((SECONDS - START_S))s): $*" | tee -a "$LOG"
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "=== $name: exit ${PIPESTATUS[0]} at t=$((SECONDS - START_S))s" | tee -a "$LOG"
}

kernels_importable() { "$PY" -c "import apa_fast.kernels.logprob" >/dev/null 2>&1; }

install_package() {
    # Editable install: maps kernels/ to apa_fast.kernels and builds apa_fast._C with this machine's nvcc.
    "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . && kernels_importable && return 0
    echo "editable install failed: building in place and linking kernels/ as apa_fast/kernels"
    "$PY" setup.py build_ext --inplace
    [ -e apa_fast/kernels ] || ln -s ../kernels apa_fast/kernels
    kernels_importable
}

export PY
export -f kernels_importable install_package

benchmark_files() {
    # The log-prob grid first (it holds the headline figures), then every other benchmark file.
    echo benchmarks/test_logprob.py
    ls benchmarks/test_*.py | grep -v '^benchmarks/test_logprob.py$'
}

{
    echo "apa_fast GPU run, $(date -u +%FT%TZ), commit ${APA_BENCH_COMMIT:-unknown}, budget ${BUDGET_S}s"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1
} | tee -a "$LOG"

stage build 150 bash -c install_package
if ! kernels_importable; then  # the build ran out of time: the Triton kernels need only the package mapping
    echo "apa_fast.kernels not importable after the build stage: linking kernels/ as apa_fast/kernels" | tee -a "$LOG"
    [ -e apa_fast/kernels ] || ln -s ../kernels apa_fast/kernels
fi
stage info 30 "$PY" -m apa_fast.info
# Correctness on this GPU first: every fused op against float64, both designs, entropy on and off, odd vocabularies.
stage cuda-tests 100 "$PY" -m pytest -q -m cuda tests/ -p no:cacheprovider
# The headline: APA loss forward+backward at 16,384 x 50,400 bf16, both designs, against plain eager and
# torch.compile of it, timed in the same call.
HEADLINE_CASES=(
    "benchmarks/test_logprob.py::test_logprob_op[apa_loss-apa_fast-full-16384x50400-bfloat16]"
    "benchmarks/test_logprob.py::test_logprob_op[apa_loss-apa_fast-fused_grad-full-16384x50400-bfloat16]"
    "benchmarks/test_logprob.py::test_logprob_op[apa_loss-eager-full-16384x50400-bfloat16]"
    "benchmarks/test_logprob.py::test_logprob_op[apa_loss-eager_compiled-full-16384x50400-bfloat16]"
)
stage headline 70 "$PY" -m pytest -q -p no:cacheprovider --benchmark-columns=median,rounds "${HEADLINE_CASES[@]}"
if command -v ncu >/dev/null 2>&1; then  # DRAM bytes and L2 hit rate per kernel: is the re-read an L2 hit?
    stage dram 45 ncu --kernel-name regex:logprob --metrics \
        dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,gpu__time_duration.sum \
        "$PY" -m benchmarks.dram_probe
else
    echo "=== dram: skipped, ncu is not installed" | tee -a "$LOG"
fi
# Padded and odd vocabularies (full-width loads, the design picked by the byte model), every provider.
stage vocab-sweep 60 "$PY" -m pytest -q -p no:cacheprovider --benchmark-columns=median,rounds benchmarks/test_logprob.py \
    -k "apa_loss and full and 16384x and bfloat16 and (x32001 or x50257 or x128256 or x151936)"
stage gae 25 "$PY" -m pytest -q -p no:cacheprovider --benchmark-columns=median,rounds benchmarks/test_gae.py
stage linear 40 "$PY" -m pytest -q -p no:cacheprovider --benchmark-columns=median,rounds benchmarks/test_linear.py -k cuda
# The update step at GPT-J-6B's shape (random-init weights, bf16, one GPU): time, tokens/s, peak memory.
stage gptj-step 80 "$PY" -m benchmarks.gptj_step --steps 2
# Leave 30 s for the report; whatever time remains goes to the rest of the grid, in its order.
stage benchmarks $(($(remaining_s) - 30)) "$PY" -m pytest -q -p no:cacheprovider --benchmark-columns=median,rounds \
    "${HEADLINE_CASES[@]/#/--deselect=}" $(benchmark_files)
stage report 30 "$PY" -m benchmarks.report --no-plots --out "$OUT_DIR"
echo "=== done at t=$((SECONDS - START_S))s; files: $(ls "$OUT_DIR" | tr '\n' ' ')" | tee -a "$LOG"
